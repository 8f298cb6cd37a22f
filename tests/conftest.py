"""Shared test set-up: no test may reach a model hub (DESIGN §4), so go offline before anything imports
huggingface_hub (it reads these variables once, at import)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
