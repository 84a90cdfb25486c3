import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tests run two at a time on two cores: one torch thread each avoids oversubscription."""
    torch.set_num_threads(1)
    yield
