"""target-replacement: training records with the edited completions and the teacher's context."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from caopd.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def target_replacement(data: Input[Dataset], rollouts: Input[Dataset], task: str, base_model: str,
                       method: str, teacher_context: str, records: Output[Dataset]):
    from pathlib import Path

    from caopd.stages.estimate import ESTIMATES, ROLLOUTS
    from caopd.stages.prepare import TRAIN
    from caopd.stages.targets import TargetsConfig, run_target_replacement

    cfg = TargetsConfig(method=method, teacher_context=teacher_context, task=task, model=base_model,
                        data=str(Path(data.path) / TRAIN), rollouts=str(Path(rollouts.path) / ROLLOUTS),
                        estimates=str(Path(rollouts.path) / ESTIMATES))
    summary = run_target_replacement(cfg, records.path)
    records.metadata.update({"method": method, "n_records": summary["n_records"],
                             "mean_target_confidence": summary["mean_target_confidence"]})
