"""Stand-in for TextGen's global state (`modules.shared`)."""

import copy
import threading
from pathlib import Path
from types import SimpleNamespace

user_data_dir = Path("user_data")
args = SimpleNamespace(loader=None, ctx_size=0, model_dir=str(user_data_dir / "models"), cpu=False, cpu_memory=0,
                       bf16=False, no_use_fast=False, portable=False, extensions=[], compute_dtype="float16",
                       trust_remote_code=False)
original_args = copy.deepcopy(args)
model = None
tokenizer = None
model_name = "None"
is_seq2seq = False
is_multimodal = False
lora_names = []
stop_everything = False
generation_lock = threading.Lock()
settings = {"truncation_length": 8192, "instruction_template_str": "", "max_new_tokens": 512}
default_settings = {}
user_config = {}  # config-user.yaml: {regex: {key: value}}
