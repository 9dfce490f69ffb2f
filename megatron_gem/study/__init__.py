"""CE-vs-GEM studies: pre-train (or import) -> SFT with CE and GEM -> export -> evaluate -> report.

A study is a list of stages, each with an output directory under the study folder ``OUT``:

    data                     OUT/data/        the embedded world (or copies of the user's JSONL)
    prep                     OUT/prep/        SentencePiece model, pre-training and SFT data
    pretrain:SIZE            OUT/SIZE/pretrain/        Megatron checkpoint (training entry)
    import:SIZE              OUT/SIZE/base/            (instead: an HF base model, converted)
    export:SIZE:base         OUT/SIZE/base-hf/         the pre-trained model as HF
    eval:SIZE:base           OUT/SIZE/base-eval/       its metrics, the held-out loss "before"
    sft:SIZE:RUN             OUT/SIZE/RUN/ckpt/        SFT from the base, intermediate saves
    export:SIZE:RUN:STEP     OUT/SIZE/RUN/hf/STEP/     each saved checkpoint as HF
    eval:SIZE:RUN:STEP       OUT/SIZE/RUN/eval/STEP/   quality, diversity, forgetting
    report                   OUT/report/      results.csv, report.md, PNG plots

RUN is ``ce`` or ``gem-b<beta>`` (``-s<seed>`` with several seeds). Every run of a size uses
the same lr, steps, batch and seed, so they differ only in the loss.

Modules: ``config`` (ModelSize, StudyConfig, presets), ``stages`` (the plan and the study
folder's state: markers, resume), ``steps`` (what each kind of stage does), ``executors``
(local and slurm), ``cli`` (``python -m megatron_gem.study``), ``report`` (results.csv,
report.md, plots), ``world`` (the embedded synthetic data).
"""

from megatron_gem.study.cli import main
from megatron_gem.study.config import PRESETS, ModelSize, StudyConfig, preset
from megatron_gem.study.executors import JOBS_FILE, SlurmOptions, run_local, run_slurm, wait_slurm
from megatron_gem.study.stages import Stage, Study, load_study, plan
from megatron_gem.study.steps import export_small, vocab_size

__all__ = [
    "JOBS_FILE",
    "PRESETS",
    "ModelSize",
    "SlurmOptions",
    "Stage",
    "Study",
    "StudyConfig",
    "export_small",
    "load_study",
    "main",
    "plan",
    "preset",
    "run_local",
    "run_slurm",
    "vocab_size",
    "wait_slurm",
]
