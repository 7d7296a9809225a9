"""A checkpoint's model.safetensors loads into torch.nn.Sequential as docs/architecture.md shows."""

import numpy as np

from core import Tensor, nn, no_grad
from tests.helpers import require
from workers import checkpoint as ckpt


def test_checkpoint_loads_into_torch_sequential(tmp_path):
    torch = require("torch")
    from safetensors.torch import load_file

    model = nn.MLP([2, 16, 16, 2], activation="tanh", seed=0)
    path = ckpt.save_checkpoint(
        tmp_path, 7, model.state_dict(), {"state": {}, "param_groups": []}, {}
    )

    state = load_file(str(path / "model.safetensors"))
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 2),
    ).double()
    net.load_state_dict(
        {f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}": v for k, v in state.items()}
    )

    x = np.random.default_rng(0).normal(size=(5, 2))
    with no_grad():
        ours = model(Tensor(x)).data
    theirs = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
