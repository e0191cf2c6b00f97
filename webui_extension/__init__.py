"""The TextGen (text-generation-webui) extension folder `mixtral_offload/`, shipped as package data.

`python -m webui_extension install --tgw-dir DIR` links it into a TextGen checkout; the code it runs lives in
`mixtral_offload_plugin.webui`.
"""
