"""A rank of the distributed tests: `python dist_worker.py JOBS.json` under the torchrun environment (the launcher's
worker_env) joins the gloo group and runs quantize_model for every job in the file, in order:
{"model": dir, "out": dir, "calib": file, "opts": {QuantizeOptions fields}, "die_at": [rank, block, "kill"|"hang"]}.
`die_at` makes that rank kill itself (SIGKILL) or hang at the start of that block (the fault tests). Each job's
report line holds the sha256 of every H this rank collected (None where it owned none of the subset), in order."""
import hashlib
import json
import os
import signal
import sys
import time

import torch

from neuqi_export import distributed, pipeline
from neuqi_export.data import read_text
from neuqi_export.errors import UserError


def main(path: str) -> int:
    torch.set_num_threads(1)
    jobs = json.loads(open(path).read())
    world, device = distributed.init("cpu", float(os.environ.get("NEUQI_TEST_TIMEOUT", "60")))
    hashes = []
    damped = distributed.OrderedHessian.damped

    def recorded(self, percdamp=0.01):
        H = damped(self, percdamp)
        hashes.append(None if H is None else hashlib.sha256(H.numpy().tobytes()).hexdigest())
        return H

    distributed.OrderedHessian.damped = recorded
    for job in jobs:
        hashes.clear()
        die = job.get("die_at")
        real = pipeline._quantize_block
        if die and die[0] == world.rank:
            def block(blk, k, *a, _real=real, **kw):
                if k == die[1]:
                    if die[2] == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(3600)
                return _real(blk, k, *a, **kw)
            pipeline._quantize_block = block
        try:
            s = pipeline.quantize_model(job["model"], job["out"], pipeline.QuantizeOptions(**job["opts"]),
                                        calib_text=read_text(job["calib"]) if job["opts"].get("calibrate", True) else None, device=device, progress=False,
                                        replay_budget=job.get("replay"))
        except UserError as exc:
            print(f"neuqi-export: error: {exc}", file=sys.stderr)
            return 2
        finally:
            pipeline._quantize_block = real
        print(json.dumps({"rank": world.rank, "layers": s.layers, "resumed": s.resumed_blocks,
                          "hessian_loss": s.hessian_loss, "H": hashes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
