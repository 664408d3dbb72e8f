import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to a busy second core


@pytest.fixture(scope="session")
def tokenizer():
    from po_registry.testing import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved to disk, so TRL can reload it as the reference model (beta > 0 without PEFT)."""
    from po_registry.testing import tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny-model")
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def prompt_dataset():
    from datasets import Dataset

    pairs = [(a, b) for a in range(3, 9) for b in range(2, 6)][:16]
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})


@pytest.fixture
def plugins():
    """Register plugin objects into the process-wide registry for one test; the registry is reloaded after."""
    from po_registry import get_registry, reload_registry

    def register(name, plugin):
        get_registry().register(plugin, name)
        return plugin

    yield register
    reload_registry()


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Embedded warm starts are built once per test session, in a private cache."""
    path = tmp_path_factory.mktemp("po-registry-cache")
    previous = os.environ.get("PO_REGISTRY_CACHE")
    os.environ["PO_REGISTRY_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("PO_REGISTRY_CACHE", None)
    else:
        os.environ["PO_REGISTRY_CACHE"] = previous
