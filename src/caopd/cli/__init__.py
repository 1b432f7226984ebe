"""``caopd`` — the command line: the parser and ``main``. A command parses, calls one stage or experiment of the
library (``commands``), and prints; errors end in one line and an exit code.

Options are generated from each stage's typed config (``options``), so the help text and the validation are the
config's own; nested fields are written with dots (``--train.lr 1e-4``, ``--sampling.temperature 0.7``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from caopd.cli import commands
from caopd.cli.options import add_config_options, add_kfp_options, add_registry_options, add_tracking_options
from caopd.config.stages import (
    CALIBRATION_EVALUATION,
    DATA_PREPARATION,
    MODEL_REGISTRATION,
    OPD_TRAINING,
    ROLLOUT_ESTIMATION,
    TARGET_REPLACEMENT,
    RegisterConfig,
)
from caopd.config.tracking import CHAMPION, PIPELINE_CREDENTIALS_SECRET, TrackingConfig
from caopd.errors import CaopdInputError, CaopdServiceError, TrainingJobFailed, TrainingStopped

EXIT_BAD_INPUT, EXIT_SERVICE = 2, 1


STAGES_TRACKED = (DATA_PREPARATION, ROLLOUT_ESTIMATION, TARGET_REPLACEMENT, OPD_TRAINING, CALIBRATION_EVALUATION,
                  MODEL_REGISTRATION)
TRACKED_COMMANDS = tuple(stage.cli for stage in STAGES_TRACKED)
# The stage commands a preset applies to (`caopd run` has its own `--preset`, a field of its config).
PRESET_COMMANDS = tuple(stage.cli for stage in STAGES_TRACKED if stage is not MODEL_REGISTRATION)


def _commands() -> list[tuple[str, str, Callable, Any, str]]:
    """(command, help, function, config, examples) of the commands built from a config; a stage's command name and
    config come from the stage table."""
    from caopd.config.experiments import CompareConfig, ContinualConfig
    from caopd.config.pretrain import PretrainConfig
    from caopd.config.run import RunConfig
    from caopd.config.scoring import ScoreConfig
    from caopd.config.standin import StandinConfig

    def stage(identity, help_text: str, func: Callable, examples: str) -> tuple[str, str, Callable, Any, str]:
        return identity.cli, help_text, func, identity.config, examples

    return [
        ("run", "the main job: base, plain OPD and CaOPD, evaluated side by side", commands.cmd_run, RunConfig,
         "examples:\n  caopd run --out runs/demo\n  caopd run --out runs/seed1 --seed 1 --train.steps 100"),
        stage(DATA_PREPARATION, "stage 0: the train and eval prompt sets (your datasets, validated, or synthetic "
              "arithmetic)", commands.cmd_prepare,
              "examples:\n  caopd prepare --out runs/data --n-train 2000 --n-eval 2000\n"
              "  caopd prepare --out runs/data --task mcq --train-source train.parquet --eval-source eval.parquet"),
        stage(ROLLOUT_ESTIMATION, "stage 1: K rollouts per prompt, verified; P = correct/K", commands.cmd_rollout,
              "example:\n  caopd rollout --data train.jsonl --k 8 --out runs/rollouts"),
        stage(TARGET_REPLACEMENT, "stage 2: target replacement (CaOPD's three edits, or plain OPD)",
              commands.cmd_targets,
              "example:\n  caopd targets --data train.jsonl --rollouts runs/rollouts/rollouts.jsonl \\\n"
              "      --estimates runs/rollouts/estimates.jsonl --method caopd --out runs/targets"),
        stage(OPD_TRAINING, "stage 3: on-policy distillation training", commands.cmd_train,
              "example:\n  caopd train --records runs/targets/records.jsonl --train.method caopd \\\n"
              "      --train.steps 200 --out runs/train"),
        stage(CALIBRATION_EVALUATION, "stage 4: calibration evaluation of one or more models", commands.cmd_evaluate,
              "example:\n  caopd evaluate --models base=tiny caopd=runs/train/model --data eval.jsonl --out runs/eval"),
        stage(MODEL_REGISTRATION, "stage 5: register a trained model in the MLflow registry (a local store unless a "
              "server is named)", commands.cmd_register,
              "examples:\n  caopd register --model-dir runs/train/model --metrics runs/eval/summary.json --arm caopd "
              "\\\n      --mlflow-dir runs/mlflow\n"
              "  caopd register --model-dir runs/train/model --metrics runs/eval/summary.json \\\n"
              "      --tracking-uri http://mlflow:5000 --name caopd-qwen3-8b --base-model Qwen/Qwen3-8B"),
        ("score", "evaluate completions you already have (a served model's logs, another system), without a model",
         commands.cmd_score, ScoreConfig,
         'COMPLETIONS: one {"id": ..., "completion": ...} per line, ids matching the prompts\' ids.\n'
         "example:\n  caopd score --task tooluse --data tooluse_eval.jsonl --completions served.jsonl \\\n"
         "      --out runs/score"),
        ("compare", "baselines in one command: base, OPD (SDFT- and SDPO-style teachers), CaOPD in both teacher "
         "modes and RLCR, in-domain and OOD, with bootstrap intervals", commands.cmd_compare, CompareConfig,
         "examples:\n  caopd compare --out runs/compare\n"
         "  caopd compare --out runs/compare --arms opd_demo caopd_demo rlcr --ood-kinds mul_2x2"),
        ("continual", "calibration forgetting: train on task A, then on task B; ECE on A before and after",
         commands.cmd_continual, ContinualConfig, "examples:\n  caopd continual --out runs/continual\n"
         "  caopd continual --out runs/continual --task-a-kinds add_2x1 add_2x2 --task-b-kinds mul_2x1 mul_2x2"),
        ("pretrain-tiny", "regenerate the packaged tiny base model (deterministic)", commands.cmd_pretrain_tiny,
         PretrainConfig, "example:\n  caopd pretrain-tiny --out tiny_checkpoint"),
        ("build-standin", "regenerate the packaged stand-in instruct model: Qwen3 architecture, chat template and "
         "thinking, a BPE tokenizer trained on the task corpora (deterministic, a few minutes)",
         commands.cmd_build_standin, StandinConfig, "example:\n  caopd build-standin --out standin_checkpoint"),
    ]


def build_parser() -> argparse.ArgumentParser:
    from caopd.config.gates import GateConfig

    parser = argparse.ArgumentParser(prog="caopd", description="Calibration-Aware On-Policy Distillation.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, func, config, epilog in _commands():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        needs_out = name != MODEL_REGISTRATION.cli
        if needs_out:
            p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--config", help="a JSON file with the config; flags override it")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == MODEL_REGISTRATION.cli:
            p.add_argument("--metrics", help="an evaluation summary.json (or a metrics JSON) to record")
            p.add_argument("--arm", default="caopd", help="which arm of the evaluation summary (default: caopd)")
        if name in TRACKED_COMMANDS:
            add_tracking_options(p)
        if name in PRESET_COMMANDS:
            from caopd.config.presets import PRESETS

            p.add_argument("--preset", choices=sorted(PRESETS), help="start from a recipe of the paper (every value "
                           "in docs/paper-setup.md); --config and the flags given win over it")
        add_config_options(p, config, skip=("metrics",) if name == MODEL_REGISTRATION.cli else ())
        p.set_defaults(func=func)
    pr = sub.add_parser("promote", help="move an alias (champion) onto the challenger after checking the gates",
                        description="Check the gates of the challenger (or --version) against the model holding "
                        "the alias now, record the decision on the version, and move the alias if they pass.",
                        epilog="example:\n  caopd promote caopd-tiny --to champion --tracking-uri http://mlflow:5000",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("name", help="registered model name")
    pr.add_argument("--to", default=CHAMPION, help="the alias to move (default: %(default)s)")
    pr.add_argument("--version", type=int, help="the version to promote (default: the challenger)")
    add_registry_options(pr)
    add_config_options(pr, GateConfig, prefix="")
    pr.set_defaults(func=commands.cmd_promote)
    li = sub.add_parser("lineage", help="datasets -> rollout -> training -> evaluation -> model version",
                        description="Print the chain behind a model version, with the key metrics of each step.",
                        epilog="examples:\n  caopd lineage caopd-tiny@champion\n  caopd lineage caopd-tiny/3 --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    li.add_argument("reference", help="NAME@ALIAS or NAME/VERSION")
    li.add_argument("--json", action="store_true", help="print the chain as JSON")
    add_registry_options(li)
    li.set_defaults(func=commands.cmd_lineage)
    ba = sub.add_parser("bootstrap-auth", help="create the pipeline, promoter and reader users of an authenticated "
                        "MLflow and their permissions (idempotent)",
                        description="As the server's admin ($MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, "
                        "or $CAOPD_MLFLOW_CREDENTIALS), make sure the experiment and the registered model exist and "
                        "that each role's user exists with its Secret's password, is no admin and holds its role's "
                        "permission on both: pipeline EDIT, promoter MANAGE on the model (moves champion) and READ on "
                        "the experiment, reader READ. Running it again changes nothing. Each --*-credentials folder "
                        "holds the files 'username' and 'password' (a mounted kubernetes.io/basic-auth Secret).",
                        epilog="example:\n  caopd bootstrap-auth --tracking-uri http://mlflow:5000 --experiment caopd "
                        "--model caopd-tiny \\\n      --pipeline-credentials /secrets/pipeline --promoter-credentials "
                        "/secrets/promoter",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ba.add_argument("--tracking-uri", help="the MLflow server (default: $MLFLOW_TRACKING_URI)")
    ba.add_argument("--experiment", default=TrackingConfig().experiment, help="the experiment the pipeline logs to")
    ba.add_argument("--model", default=RegisterConfig.model_fields["name"].default,
                    help="the registered model the pipeline registers into")
    for role in ("pipeline", "promoter", "reader"):
        ba.add_argument(f"--{role}-credentials", metavar="DIR", required=role == "pipeline",
                        help=f"the {role} identity's Secret folder (files username, password)")
    ba.add_argument("--connect-timeout-s", type=float, default=30.0, help="wait this long for the server")
    ba.set_defaults(func=commands.cmd_bootstrap_auth)
    c = sub.add_parser("compile", help="write the compiled KFP pipeline spec (YAML)",
                       description="Compile the pipeline to the YAML a KFP server or the Kubeflow UI uploads.",
                       epilog="examples:\n  caopd compile --out caopd_pipeline.yaml\n"
                       "  caopd compile --out caopd_pipeline.yaml --workspace-pvc caopd-workspace",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--out", required=True, help="the YAML file to write")
    c.add_argument("--workspace-pvc", help="a ReadWriteMany PVC mounted on the training step: checkpoints outlive "
                   "the pod, and train_launch may start TrainJobs / PyTorchJobs (the chart's workspace creates one)")
    c.add_argument("--mlflow-secret", default=PIPELINE_CREDENTIALS_SECRET, metavar="SECRET",
                   help="the Secret (keys username, password) whose MLflow identity every tracked task uses, as "
                   "$MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD (default: %(default)s, the chart's; "
                   "'' = none)")
    c.add_argument("--secret-env", action="append", metavar="NAME=SECRET/KEY",
                   help="another variable from a Secret on every tracked task (repeatable), e.g. "
                   "AWS_SECRET_ACCESS_KEY=caopd-s3/AWS_SECRET_ACCESS_KEY")
    c.set_defaults(func=commands.cmd_compile)
    s_ = sub.add_parser("submit", help="upload the pipeline (new version if changed) and start a run on KFP",
                        description="Upload the compiled pipeline to a KFP server (a new version when the spec "
                        "changed) and start a run.",
                        epilog="example:\n  KFP_TOKEN=... caopd submit --host https://kubeflow.example.com/pipeline "
                        "\\\n      --param base_model=Qwen/Qwen3-8B --param steps=500 --param accelerator_count=1",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kfp_options(s_)
    s_.set_defaults(func=commands.cmd_submit)
    r = sub.add_parser("schedule", help="create a recurring run of the pipeline on KFP",
                       description="Upload the compiled pipeline (as submit does) and create a recurring run.",
                       epilog="example (every Sunday 03:00):\n  caopd schedule --host https://kubeflow.example.com/"
                       "pipeline --token-file /secrets/kfp-token \\\n      --cron '0 0 3 * * 0'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kfp_options(r)
    r.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * 0' = Sundays at 03:00")
    r.add_argument("--name", help="recurring run name (default: the pipeline name and the cron)")
    r.set_defaults(func=commands.cmd_schedule)
    cv = sub.add_parser("convert", help="turn a released dataset into the task's rows (ToolAlpaca -> tooluse)",
                        description="Convert the ToolAlpaca release format (one record per API with Instructions "
                        "and Golden_Answers) into tool-use rows: one per instruction, with the paper's prompt (before "
                        "the confidence instruction, which the task adds), golden_answer, name and the demonstration.",
                        epilog="example:\n  caopd convert toolalpaca data/toolalpaca/eval_real.json --out "
                               "tooluse_eval.jsonl",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cv.add_argument("format", choices=["toolalpaca"], help="the release format")
    cv.add_argument("file", help="the released file (ToolAlpaca: a JSON list of API records)")
    cv.add_argument("--out", required=True, help="the rows to write (.jsonl)")
    cv.set_defaults(func=commands.cmd_convert)
    pl = sub.add_parser("plan", help="per-stage, per-GPU memory of a run; refuses one that cannot fit",
                        description="Print each GPU stage's memory per GPU (weights, gradients, optimizer, teacher, "
                        "activations, logits, KV cache, vLLM share) from the model's config.json and the settings, "
                        "and exit 2 with one line naming the setting to change when a stage cannot fit the card "
                        "(docs/memory.md). Settings not given take the preset's values, else the defaults.",
                        epilog="examples:\n  caopd plan --model Qwen/Qwen3-8B --gpus 1 --gpu-memory-gib 80 "
                        "--precision bf16 --finetune lora\n  caopd plan --model Qwen/Qwen3-32B --gpus 8 "
                        "--gpu-memory-gib 141 --preset paper-tooluse --sharding fsdp",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_options(pl)
    pl.set_defaults(func=commands.cmd_plan)
    m = sub.add_parser("metrics", help="calibration metrics of a predictions JSONL file",
                       description="Print accuracy, ECE, Brier, AUROC, SPR, mean confidence, overconfidence gap "
                       "and missing rate of FILE, one JSON object.",
                       epilog='FILE: one {"confidence": float|null, "correct": bool} per line.\n'
                              "example:\n  caopd metrics runs/demo/evaluation/predictions_caopd.jsonl",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("file")
    m.set_defaults(func=commands.cmd_metrics)
    ro = sub.add_parser("route", help="cascade routing: when to call the large model, from the small one's confidence",
                        description="Sweep the confidence threshold below which a prompt goes to the large model; "
                        "report accuracy against cost, the cheapest threshold reaching --target-accuracy and its "
                        "saving against calling the large model on every prompt (routing.json, .md, .png).",
                        epilog="example (the tiny default has no large model; state its accuracy):\n"
                               "  caopd route --small caopd=runs/demo/evaluation/predictions_caopd.jsonl \\\n"
                               "      --small opd=runs/demo/evaluation/predictions_opd.jsonl \\\n"
                               "      --large-accuracy 0.95 --large-cost 10 --target-accuracy 0.85 --out runs/route",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ro.add_argument("--small", action="append", required=True, metavar="[NAME=]FILE",
                    help="a small model's predictions JSONL (prompt_id, confidence, correct); repeat to compare")
    ro.add_argument("--large", help="the large model's predictions JSONL on the same prompts")
    ro.add_argument("--large-accuracy", type=float, help="the large model's accuracy, instead of its predictions")
    ro.add_argument("--small-cost", type=float, default=1.0, help="cost of one small-model call (default 1)")
    ro.add_argument("--large-cost", type=float, default=10.0, help="cost of one large-model call (default 10)")
    ro.add_argument("--target-accuracy", type=float, required=True, help="the accuracy the cascade must reach")
    ro.add_argument("--out", required=True, help="folder for routing.json, routing.md and routing.png")
    ro.set_defaults(func=commands.cmd_route)
    return parser


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """``caopd plan``'s flags; a setting left out takes the preset's value, else the stage configs' default."""
    from caopd.config.presets import PRESETS

    p.add_argument("--model", required=True, help="a Qwen3 hub id whose config ships with caopd (Qwen/Qwen3-0.6B "
                   "… Qwen/Qwen3-32B), a local model folder, 'tiny', 'standin', or another hub id (its config.json "
                   "is downloaded)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs training runs on (default 1)")
    p.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU in GiB (80 for an "
                   "A100/H100 80 GB, 141 for an H200)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a paper recipe's settings as the defaults")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="training precision")
    p.add_argument("--finetune", choices=["full", "lora"], help="full fine-tune or LoRA adapters")
    p.add_argument("--sharding", choices=["replicate", "fsdp"], help="several GPUs: replicate or FSDP")
    p.add_argument("--engine", choices=["vllm", "transformers"], default="vllm", help="the sampling engine of "
                   "every stage (default vllm, what a GPU runs; colocated beside the trainer)")
    p.add_argument("--k", type=int, help="samples per prompt (rollout estimation and training)")
    p.add_argument("--prompts-per-step", type=int, help="training prompts per optimizer step")
    p.add_argument("--micro-batch-size", type=int, help="completions per forward/backward")
    p.add_argument("--max-prompt-tokens", type=int, help="the longest prompt in tokens (default: the preset's "
                   "max_prompt_tokens, else 1024)")
    p.add_argument("--max-new-tokens", type=int, help="completion tokens of rollouts and training samples")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each decoder layer's activations in the backward (training's default: on)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (with --finetune lora)")
    p.add_argument("--teacher", choices=["frozen", "student", "ema", "separate", "server"], help="the teacher kind")


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid config: field '{where}': {first['msg']}{more}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CaopdInputError as err:
        print(f"caopd: error: {err}", file=sys.stderr)
    except ValidationError as err:
        print(f"caopd: error: {_one_line(err)}", file=sys.stderr)
    except (CaopdServiceError, TrainingJobFailed) as err:
        print(f"caopd: error: {err}", file=sys.stderr)
        return EXIT_SERVICE
    except TrainingStopped as err:  # preempted (143, like a process SIGTERM ends) or a non-finite loss (3)
        print(f"caopd: stopped: {err}", file=sys.stderr)
        return err.exit_code
    return EXIT_BAD_INPUT

