"""Small demo-shaped recipes for tests: written into a tmp folder, so lock files never land in data_manifests/."""
from __future__ import annotations

from pathlib import Path

SIZES = ("{smoltalk_train=150, smoltalk_test=30, mmlu_auxiliary_train=60, mmlu_test=30, gsm8k_train=60, "
         "gsm8k_test=30, identity=20}")
DEMO_TRAIN = """
[[train]]
kind = "smoltalk"
params = { split = "train" }

[[train]]
kind = "customjson"
name = "identity"
params = { path = "identity_conversations.jsonl" }
repeat = 2

[[train]]
kind = "mmlu"
params = { split = "auxiliary_train" }
repeat = 2

[[train]]
kind = "gsm8k"
params = { split = "train" }

[[train]]
kind = "simplespelling"
params = { size = 100, split = "train" }

[[train]]
kind = "spellingbee"
params = { size = 100, split = "train" }
"""
DEMO_VAL = """
[[val]]
kind = "smoltalk"
params = { split = "test" }

[[val]]
kind = "mmlu"
params = { split = "test" }

[[val]]
kind = "gsm8k"
params = { split = "test" }
stop = 20
"""


def write_recipe(folder: Path, *, name="small", mask_policy="assistant", overlong="truncate", bad_rows="fail",
                 mixture_seed=42, window=64, train=DEMO_TRAIN, val=DEMO_VAL, filename="small.toml",
                 sizes=SIZES, rows_per_shard=64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(f"""
name = "{name}"
max_seq_len = 256
mask_policy = "{mask_policy}"
overlong = "{overlong}"
bad_rows = "{bad_rows}"
mixture_seed = {mixture_seed}
rows_per_shard = {rows_per_shard}

[tokenizer]
source = "train"
vocab_size = 512

[packing]
method = "bestfit"
window = {window}

[demo]
seed = 0
sizes = {sizes}
{train}
{val}
""")
    return path


# A chat task reading one file (format with path=...) beside a spelling task, and a SmolTalk val split.
CHAT_TRAIN = """
[[train]]
kind = "chat"
name = "mychat"
params = {{ paths = "{path}" }}

[[train]]
kind = "simplespelling"
params = {{ size = 50, split = "train" }}
"""
CHAT_VAL = """
[[val]]
kind = "smoltalk"
params = { split = "test" }
"""
