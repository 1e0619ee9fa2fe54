"""The merge engine: plan from headers, then stream tensors through a method into shards."""

from neuroloc_cli.merge.plan import MergePlan, Step, build_plan
from neuroloc_cli.merge.run import MergeResult, run_merge

__all__ = ["MergePlan", "MergeResult", "Step", "build_plan", "run_merge"]
