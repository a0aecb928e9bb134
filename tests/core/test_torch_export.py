"""Every tower of every registered model exports with ``torch.export`` and matches eager.

The batch dimension is dynamic, and the text tower's length too: token ids shorter than the context
(captions are usually much shorter) must run through the exported program unchanged. The big models
are exported with fewer blocks, which keeps every code path but not the cost.
"""

import pytest
import torch
from torch.export import Dim

from polymodal import create_model, list_models

# one block per stage is enough to trace every code path of an encoder
FEWER_LAYERS = {"vit": {"layers": 1}, "text_transformer": {"layers": 1}, "modified_resnet": {"layers": [1, 1, 1, 1]}}


def text_ids(batch: int, length: int, eot: int = 49407) -> torch.Tensor:
    """CLIP-style rows: start token, words, end of text (the highest id), zero padding."""
    g = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = min(1 + i, length - 2)
        ids[i, 0] = 49406
        ids[i, 1 : n + 1] = torch.randint(1, 1000, (n,), generator=g)
        ids[i, n + 1] = eot
    return ids


def tower_inputs(modality: str, tower: torch.nn.Module, batch: int, length: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    if modality == "image":
        size = tower.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return torch.randn(batch, 3, *size, generator=g)
    if modality == "audio":
        return torch.randn(batch, 16000, generator=g) * 0.1
    return text_ids(batch, length or tower.context_length)


def towers_of_registered_models():
    for name in list_models():
        config = create_model(name, device="meta").config
        for modality, tower in sorted(config.towers.items()):
            yield pytest.param(name, modality, FEWER_LAYERS.get(tower.type, {}), id=f"{name}-{modality}")


@pytest.mark.parametrize("name, modality, overrides", list(towers_of_registered_models()))
def test_tower_exports_with_dynamic_batch_and_matches_eager(name, modality, overrides):
    torch.manual_seed(0)
    model = create_model(name, **({modality: overrides} if overrides else {})).eval()
    tower = model.towers[modality]
    example = tower_inputs(modality, tower, batch=3)
    dims = {0: Dim("batch", min=1, max=64)}
    if modality == "text":
        dims[1] = Dim("length", min=2, max=tower.context_length)
    program = torch.export.export(tower, (example,), dynamic_shapes=(dims,), strict=False).module()
    shapes = [(2, None), (5, None)] + ([(2, 7), (4, 3)] if modality == "text" else [])
    with torch.no_grad():
        for batch, length in shapes:
            x = tower_inputs(modality, tower, batch, length)
            torch.testing.assert_close(program(x), tower(x), rtol=1e-5, atol=1e-5)
