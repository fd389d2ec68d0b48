"""How the expected LRs in tests/solver.rs were produced: fvcore's schedulers composed exactly as detectron2's
`build_lr_scheduler` / `WarmupParamScheduler` / `LRMultiplier` do. fvcore is not in the .venv; regenerate with
`pip install --no-deps --target /tmp/fv fvcore==0.1.5.post20221221` and `PYTHONPATH=/tmp/fv .venv/bin/python THIS`.
"""
from fvcore.common.param_scheduler import (CompositeParamScheduler, ConstantParamScheduler,
    LinearParamScheduler, MultiStepParamScheduler, CosineParamScheduler)
class WarmupParamScheduler(CompositeParamScheduler):  # detectron2/solver/lr_scheduler.py composition
    def __init__(self, scheduler, warmup_factor, warmup_length, warmup_method="linear"):
        end_value = scheduler(warmup_length)
        start_value = warmup_factor * scheduler(0.0)
        warmup = ConstantParamScheduler(start_value) if warmup_method == "constant" else LinearParamScheduler(start_value, end_value)
        super().__init__([warmup, scheduler], interval_scaling=["rescaled", "fixed"], lengths=[warmup_length, 1 - warmup_length])
def build(kind, base_lr, max_iter, steps, gamma, warmup_iters, factor, method, base_lr_end=0.0):
    if kind == "multistep":
        steps = [x for x in steps if x <= max_iter]
        s = MultiStepParamScheduler(values=[gamma**k for k in range(len(steps) + 1)], milestones=steps, num_updates=max_iter)
    else:
        s = CosineParamScheduler(1, base_lr_end / base_lr)
    s = WarmupParamScheduler(s, factor, min(warmup_iters / max_iter, 1.0), method)
    return lambda it: base_lr * s(it / max_iter)
cases = [
 ("multistep", 0.02, 90000, [60000, 80000], 0.1, 1000, 0.001, "linear", 0.0, [0,1,500,999,1000,1001,59999,60000,60001,79999,80000,89999,90000]),
 ("multistep", 0.02, 270000, [210000, 250000, 300000], 0.1, 1000, 0.001, "constant", 0.0, [0,999,1000,209999,210000,250000,269999]),
 ("cosine", 0.01, 1000, [], 0.1, 100, 0.001, "linear", 0.0001, [0,1,50,99,100,101,500,999,1000]),
 ("multistep", 0.05, 300, [200], 0.5, 0, 0.001, "linear", 0.0, [0,1,199,200,299]),
]
for kind, lr, mi, steps, g, wi, f, m, end, its in cases:
    fn = build(kind, lr, mi, steps, g, wi, f, m, end)
    print(kind, lr, mi, steps, g, wi, f, m, end, [(i, repr(fn(i))) for i in its])
