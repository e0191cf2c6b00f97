"""A minimal stand-in for TextGen's `modules` package: only the surface the MixtralOffload loader touches.

Written from the behaviour described in shared/notes/webui-integration.md (TextGen v4.7.3); no TextGen code.
"""
