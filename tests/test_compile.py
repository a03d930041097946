"""`[runtime].compile`: each block's attention half compiled once, same values and gradients as eager.

Inductor on CPU compiles C++ with gcc, which is slow on a shared 2-core machine: the test compiles one global layer
(about 40 s of CPU on a cold cache, seconds on a warm one); a compiled local layer takes about three times longer,
so the local kinds are compiled in tests/test_gpu.py, where a GPU is lent.
"""

import dataclasses

import pytest
import torch

from vpmoe import VpMoE

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.mark.timeout(300)
def test_compiled_block_matches_eager_forward_and_backward(tiny_cfg, gen):
    cfg = tiny_cfg.replace(model=dataclasses.replace(tiny_cfg.model, num_layers=1),
                           attention=dataclasses.replace(tiny_cfg.attention, window_attn_skip_freq=1),
                           runtime=dataclasses.replace(tiny_cfg.runtime, attention_kernel="blocked"))
    tokens = torch.randint(0, 201088, (2, 48), generator=gen)
    models = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        models[compiled] = VpMoE(cfg.replace(runtime=dataclasses.replace(cfg.runtime, compile=compiled)))
    eager, compiled = models[False], models[True]
    assert [b.attn.kind for b in compiled.blocks] == ["global"]
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and hook paths keep their names
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        out = model(tokens, labels=tokens, return_logits=False)
        out.loss.backward()
        losses[name] = out.loss.detach()
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-6, atol=1e-6)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-5, atol=1e-7, msg=name)
