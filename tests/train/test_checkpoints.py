"""sft.train.checkpoints helpers that need no training run."""
import pytest
import torch


def test_a_storage_tagged_for_an_indexed_cpu_device_loads_on_the_cpu():
    """transformers 5.17 resumes a multi-process CPU run's optimizer with map_location="cpu:0"."""
    import io

    from sft.train.checkpoints import allow_indexed_cpu_restore

    buffer = io.BytesIO()
    torch.save({"exp_avg": torch.arange(6.0)}, buffer)
    allow_indexed_cpu_restore()
    allow_indexed_cpu_restore()  # idempotent: one rule
    buffer.seek(0)
    state = torch.load(buffer, map_location=torch.device("cpu:0"), weights_only=True)
    assert state["exp_avg"].device.type == "cpu" and torch.equal(state["exp_avg"], torch.arange(6.0))
    buffer.seek(0)
    with pytest.raises(RuntimeError, match="meta:0|don't know how to restore"):  # other locations: torch's rules
        torch.load(buffer, map_location="nowhere:0", weights_only=True)
