"""Stand-in for `modules.sampler_hijack` (TextGen patches transformers' sampling here); counts the calls."""

calls = 0


def hijack_samplers():
    global calls
    calls += 1
