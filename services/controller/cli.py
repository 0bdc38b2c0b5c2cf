"""The `flowgrpo` command."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from services.controller import loopback
from services.controller.preflight import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "deploy" / "configs" / "tiny_cpu.yaml"

EPILOG = """\
examples:
  flowgrpo train                                   tiny CPU run on a local Ray cluster (about 50 s)
  flowgrpo train --set run.iterations=50 --set rollout.num_workers=1
  flowgrpo train --config deploy/configs/sd35_geneval.yaml --run-dir runs/geneval
  flowgrpo train --resume runs/geneval             continue from the last checkpoint
  flowgrpo eval runs/geneval                       the paper's evaluation of the run's latest checkpoint
  flowgrpo eval --config deploy/configs/sd35_geneval.yaml --base --run-dir runs/sd35-base
                                                   the same for the base model (the row before training)
  flowgrpo make-tiny-model /tmp/tiny --preset m    the offline tiny SD3.5-architecture model
  flowgrpo make-prompts geneval train.jsonl --avoid test_metadata.jsonl
                                                   GenEval-style training prompts, none from the test set
  flowgrpo serve-reward --scorer ocr --port 50051  a scorer behind gRPC, in its own process
  flowgrpo gpu-check --json gpu.json               SD3.5 Medium's per-role speed and memory on this GPU
  flowgrpo plan --run runs/geneval --gpus 16       the fastest placement and split of 16 GPUs
  flowgrpo scale runs/geneval --rollout-workers 4  more or fewer rollout workers for a running job
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowgrpo", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Flow-GRPO: online RL for flow-matching text-to-image models, as an actor-learner job on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a LoRA with Flow-GRPO",
                           description="Train a LoRA with Flow-GRPO. With no --config, runs the tiny CPU default "
                                       f"({DEFAULT_CONFIG.relative_to(REPO_ROOT)}) on a local Ray cluster.")
    train.add_argument("--config", type=Path, help="YAML config (default: the tiny CPU config)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by its dotted YAML path, e.g. run.iterations=20 (repeatable)")
    train.add_argument("--run-dir", type=Path, help="run folder, new or empty (default: runs/<run.name>-<time>)")
    train.add_argument("--overwrite", action="store_true",
                       help="delete the earlier run in --run-dir and start a new one there")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its last checkpoint, with its config.yaml and any "
                            "--set changes (recorded in RUN_DIR/resumes.jsonl)")
    train.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local cluster)")

    tiny = sub.add_parser("make-tiny-model", help="build the offline tiny SD3.5-architecture model",
                          description="Build a tiny pipeline of the SD3.5 classes with random weights, offline, "
                                      "and save it where model.path can point.")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--preset", choices=["s", "m"], default="s", help="s: 2 layers (fast), m: 4 layers")
    tiny.add_argument("--seed", type=int, default=0)

    toy = sub.add_parser("pretrain-toy", help="pretrain the toy-world model on the CPU",
                         description="Pretrain the tiny SD3.5-architecture model on the toy world's scenes "
                                     "(common/toy_world.py) with flow matching, on the CPU, and save it as a "
                                     "diffusers pipeline in OUT_DIR; its two CLIP text encoders are first trained "
                                     "contrastively on the scenes (common/toy_clip.py). The defaults made the shipped "
                                     "common/toy_model (10 minutes on two idle cores); the same seed and threads "
                                     "give the same model.")
    toy.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    toy.add_argument("--steps", type=int, default=3000, help="optimizer steps of 64 scenes (default 3000)")
    toy.add_argument("--text-steps", type=int, default=3000, metavar="STEPS",
                     help="contrastive steps of each CLIP text encoder, before the transformer's (default 3000)")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--threads", type=int, default=2,
                     help="torch threads (default 2; results depend on it, as on the seed)")
    toy.add_argument("--overwrite", action="store_true",
                     help="write into a non-empty OUT_DIR, replacing the model files there (else it is refused)")
    toy.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                     help="also save the model every STEPS steps, to look at it while it trains (default: at the end)")

    prompts = sub.add_parser("make-prompts", help="generate GenEval-style training prompts",
                             description="Write GenEval-style training metadata (JSONL, the format of GenEval's "
                                         "test_metadata.jsonl) drawn from the 80 COCO classes, colours and "
                                         "relations: the paper's GenEval training split is not published.")
    prompts.add_argument("kind", choices=["geneval"])
    prompts.add_argument("output", type=Path, help="the JSONL file to write")
    prompts.add_argument("--n", type=int, default=50_000, help="number of prompts (default 50000)")
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--avoid", type=Path, metavar="JSONL",
                         help="a metadata file whose prompts must not appear (e.g. the test set)")

    serve = sub.add_parser("serve-reward", help="run one scorer behind a gRPC service",
                           description="Serve one scorer over gRPC (images as PNG), for scorers that need their "
                                       "own process or environment. Use it from a run with "
                                       "reward.endpoints: {NAME: grpc://HOST:PORT}.")
    serve.add_argument("--scorer", required=True, help="scorer name, e.g. ocr, geneval, pickscore, brightness")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--config", type=Path, help="YAML config whose reward section configures the scorer")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    evaluate = sub.add_parser(
        "eval", help="the paper's evaluation of a run's LoRA or of the base model",
        description="Evaluate as the paper: every test prompt (prompts.eval) with run.eval_images_per_prompt ODE "
                    "samples of sample.eval_steps steps, scored by the run's scorers and reward.eval; GenEval "
                    "accuracy per tag and overall, OCR accuracy, PickScore. Writes RUN_DIR/eval/iter_N.json "
                    "(and .parquet, .png), RUN_DIR/eval.jsonl and TensorBoard scalars.")
    evaluate.add_argument("run", type=Path, nargs="?", metavar="RUN_DIR",
                          help="a run folder: evaluates the EMA LoRA of its latest checkpoint, with its config.yaml")
    evaluate.add_argument("--checkpoint", type=int, metavar="N", help="the checkpoint of iteration N instead")
    evaluate.add_argument("--base", action="store_true",
                          help="the base model (LoRA at zero), written as iteration 0: the row before training "
                               "(with RUN_DIR: with that run's config, into RUN_DIR)")
    evaluate.add_argument("--config", type=Path, help="with --base and no RUN_DIR: YAML config (default: the tiny one)")
    evaluate.add_argument("--run-dir", type=Path, metavar="OUT", help="with --base and no RUN_DIR: where to write "
                                                                      "(default: runs/<run.name>-base-<time>)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. run.eval_prompts=64 or rollout.num_workers=8")
    evaluate.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local cluster)")

    check = sub.add_parser(
        "gpu-check", help="per-role speed and memory of SD3.5 Medium on this GPU (random weights)",
        description="Build SD3.5 Medium's transformer from its published config with random weights (no download; "
                    "random embeddings of the real shapes stand in for the text encoders) and measure, through the "
                    "project's own sampler and learner code: rollout images/s, learner samples/s with and without "
                    "KL and gradient checkpointing, peak memory per role, the first-step ratio deviation in "
                    "model.precision, and the time to serialize the LoRA and load it into 4 transformers. "
                    "Under 8 minutes on one GPU. --size small runs the same code on a tiny model in seconds.")
    check.add_argument("--config", type=Path, help="YAML config for precision, sizes and loss "
                                                   "(default: deploy/configs/sd35_geneval.yaml)")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. model.precision=bf16 or train.micro_batch_size=4")
    check.add_argument("--size", choices=["sd35-medium", "small"], default="sd35-medium",
                       help="sd35-medium (default) or small: a tiny transformer on the CPU, to test the command")
    check.add_argument("--repeats", type=int, default=2, help="timed repetitions after one warm-up (default 2)")
    check.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON (for flowgrpo plan)")

    scale = sub.add_parser(
        "scale", help="change the number of rollout workers of a running job",
        description="Ask the job training in RUN_DIR (started with flowgrpo train or submitted with Ray Jobs) for "
                    "N rollout workers. New ones join at the next iteration once the cluster places them; "
                    "removed ones stop once their calls are collected. rollout_workers and scale_events in "
                    "RUN_DIR/metrics.jsonl show when.")
    scale.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder of the running job")
    scale.add_argument("--rollout-workers", type=int, required=True, metavar="N", help="rollout workers wanted")
    scale.add_argument("--cluster", metavar="ADDRESS",
                       help="the job's Ray cluster (default: $RAY_ADDRESS, else the cluster on this machine)")

    planner = sub.add_parser(
        "plan", help="the fastest placement and split of N GPUs, predicted from measured costs",
        description="Predict the time per iteration of every placement (split, colocated) and split of --gpus "
                    "devices in sync and async mode, beside the paper's script (every device samples, then "
                    "trains), from per-role costs measured in a run (--run), by flowgrpo gpu-check "
                    "(--from-gpu-check), or given per image (--per-image-seconds); the model is in "
                    "services/controller/planner.py.")
    source = planner.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, metavar="RUN_DIR", help="a run folder of flowgrpo train (its "
                                                                    "metrics.jsonl and config.yaml)")
    source.add_argument("--from-gpu-check", type=Path, metavar="JSON", help="the figures of flowgrpo gpu-check --json")
    source.add_argument("--per-image-seconds", metavar="ROLLOUT,LEARN",
                        help="seconds to sample one image and to train on one, on one device (e.g. 1,2.5)")
    planner.add_argument("--gpus", type=int, required=True, metavar="N", help="devices to plan for")
    planner.add_argument("--config", type=Path, help="with --from-gpu-check or --per-image-seconds: the run's YAML "
                                                     "config (default: deploy/configs/sd35_geneval.yaml)")
    planner.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    planner.add_argument("--compare", type=Path, nargs="+", metavar="RUN_DIR",
                         help="measured runs of other layouts: each one's time per iteration beside the prediction")
    return parser


# A user error raised in a worker's __init__ reaches the driver only as the text of Ray's
# ActorDiedError, whose last line is Python's "module.Class: message".
_WORKER_USER_ERROR = re.compile(
    r"^(?:common\.config\.ConfigError|common\.lora\.LoraLoadError|common\.prompts\.PromptFileError): (.+)$", re.M)


def _train(args) -> int:
    from common.config import load_config
    from services.controller import run_folder
    from services.controller.preflight import prepare

    if args.resume:
        for flag, given in (("--config", args.config), ("--run-dir", args.run_dir), ("--overwrite", args.overwrite)):
            if given:
                raise run_folder.RunFolderError(f"{flag}: not with --resume, which continues the run in its own "
                                                f"folder with its config.yaml (change values with --set)")
        run_dir = args.resume
        done = run_folder.resume_point(run_dir)
        config = load_config(run_dir / "config.yaml", args.overrides)
        total = config.run.iterations
        if done >= total:
            print(f"flowgrpo: {run_dir} is already complete ({done} of run.iterations={total} iterations done); "
                  f"to train on, raise it: --resume {run_dir} --set run.iterations={2 * done}", file=sys.stderr)
            return 0
        changes = run_folder.config_changes(run_dir, config)
        print(f"flowgrpo: resuming {run_dir} from iteration {done} of {total}"
              + "".join(f"; {key}: {old} -> {new}" for key, (old, new) in changes.items()), file=sys.stderr)
        config = prepare(config)
    else:
        config = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        run_dir = args.run_dir or Path("runs") / f"{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        replace = run_folder.check_new_run_dir(run_dir, args.overwrite)
        config = prepare(config)
        if replace:
            print(f"flowgrpo: --overwrite: deleting the earlier run in {run_dir}", file=sys.stderr)
            run_folder.remove_run(run_dir)
        print(f"flowgrpo: run folder {run_dir}", file=sys.stderr)
    from ray.exceptions import RayActorError

    from services.controller.job import train
    from services.controller.trainer import RunFailed

    try:
        history = train(config, run_dir, resume=args.resume is not None, address=args.address)
    except KeyboardInterrupt:
        print(f"flowgrpo: interrupted; {_how_to_continue(run_dir)}", file=sys.stderr)
        return 130
    except RunFailed as err:
        print(f"flowgrpo: error: {err}; {_how_to_continue(run_dir)}", file=sys.stderr)
        return 1
    except RayActorError as err:
        found = _WORKER_USER_ERROR.findall(str(err))
        if not found:
            raise
        print(f"flowgrpo: error: {found[-1]} (raised in a worker as it started)", file=sys.stderr)
        return 2
    if history:
        first, last = history[0]["reward_mean"], history[-1]["reward_mean"]
        print(f"flowgrpo: reward mean {first:.4f} -> {last:.4f} over {len(history)} iterations; curve in "
              f"{Path(run_dir) / 'reward_curve.png'}, LoRA in {Path(run_dir) / 'lora'}", file=sys.stderr)
    return 0


def _how_to_continue(run_dir: Path) -> str:
    """What an interrupted run left behind, and the command that carries on from there."""
    from services.controller import run_folder

    if not run_dir.exists():
        return f"it stopped before its first iteration and left nothing in {run_dir}"
    try:
        done = run_folder.resume_point(run_dir)
    except run_folder.RunFolderError:
        return (f"{run_dir} has no checkpoint yet, so it cannot be resumed; start again with "
                f"`flowgrpo train --run-dir {run_dir} --overwrite`")
    return f"continue from iteration {done} with `flowgrpo train --resume {run_dir}`"


def _eval(args) -> int:
    from common.config import ConfigError, load_config
    from services.controller.evaluation import run_eval
    from services.controller.preflight import prepare
    from services.controller.run_folder import is_run

    if args.run is None and not args.base:
        raise ConfigError("flowgrpo eval: give RUN_DIR (a run's LoRA) or --base (the base model)")
    if args.base and args.checkpoint is not None:
        raise ConfigError("--checkpoint: not with --base, which evaluates the base model (the LoRA at zero)")
    if args.run is not None:
        for flag, given in (("--config", args.config), ("--run-dir", args.run_dir)):
            if given:
                raise ConfigError(f"{flag}: not with RUN_DIR, whose config.yaml is used and where the results go "
                                  "(change values with --set)")
        if not is_run(args.run):
            raise ConfigError(f"RUN_DIR {args.run}: not a run folder (no config.yaml of flowgrpo train); give one, "
                              "or evaluate the base model with --config CFG --base")
        config, run_dir = load_config(args.run / "config.yaml", args.overrides), args.run
    else:
        config = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        run_dir = args.run_dir or Path("runs") / f"{config.run.name}-base-{time.strftime('%Y%m%d-%H%M%S')}"
    metrics = run_eval(prepare(config), run_dir, checkpoint=args.checkpoint, base=args.base, address=args.address)
    shown = [k for k in metrics if k.startswith(("geneval/", "ocr/accuracy", "pickscore/mean"))] or \
        [k for k in metrics if k.endswith("/mean")]
    print("flowgrpo: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in shown)
          + f"; {metrics['images']:.0f} images, {metrics['groups_failed']:.0f} prompts failed scoring, "
          f"{metrics['time/evaluate']:.1f} s; in {Path(run_dir) / 'eval'}", file=sys.stderr)
    return 0


def _make_prompts(args) -> int:
    import json

    from common.prompts import generate_geneval_prompts, load_prompts

    avoid = {r.prompt for r in load_prompts(args.avoid, "geneval")} if args.avoid else set()
    records = generate_geneval_prompts(args.n, args.seed, avoid=avoid)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(r.metadata) + "\n" for r in records))
    print(f"flowgrpo: {len(records)} GenEval prompts written to {args.output}")
    return 0


def _pretrain_toy(args) -> int:
    import torch

    from common.toy_pretrain import PretrainConfig, pretrain

    if args.steps < 1 or args.threads < 1 or args.text_steps < 0:
        print("flowgrpo: error: --steps and --threads must be at least 1, --text-steps at least 0", file=sys.stderr)
        return 2
    if args.out_dir.exists() and any(args.out_dir.iterdir()) and not args.overwrite:
        print(f"flowgrpo: error: OUT_DIR {args.out_dir} is not empty; give a new folder, or add --overwrite "
              f"to write the model over what it holds", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    record = pretrain(args.out_dir, PretrainConfig(steps=args.steps, seed=args.seed, save_every=args.save_every,
                                                    clip_steps=args.text_steps))
    print(f"flowgrpo: toy model saved in {args.out_dir} after {args.steps} steps, loss {record['final_loss']:.4f}, "
          f"{record['seconds'] / 60:.1f} min")
    return 0


SD35_CONFIG = REPO_ROOT / "deploy" / "configs" / "sd35_geneval.yaml"


def _gpu_check(args) -> int:
    from common.config import ConfigError, load_config
    from services.controller.gpu_check import run_check, write_json

    if args.repeats < 1:
        raise ConfigError("--repeats: must be at least 1")
    overrides = (["model.device=cpu", "model.precision=fp32"] if args.size == "small" else []) + args.overrides
    figures = run_check(load_config(args.config or SD35_CONFIG, overrides), args.size, args.repeats)
    if args.json:
        write_json(figures, args.json)
        print(f"flowgrpo: figures written to {args.json}")
    return 0


def _plan(args) -> int:
    from common.config import ConfigError, load_config
    from services.controller import planner

    if args.gpus < 1:
        raise ConfigError("--gpus: must be at least 1")
    if args.run:
        if args.config:
            raise ConfigError("--config: not with --run, whose config.yaml is used")
        costs, config = planner.costs_from_run(args.run)
    else:
        config = load_config(args.config or SD35_CONFIG, args.overrides)
        if args.from_gpu_check:
            costs = planner.costs_from_gpu_check(args.from_gpu_check, config)
        else:
            try:
                rollout, learn = (float(v) for v in args.per_image_seconds.split(","))
            except ValueError:
                raise ConfigError(f"--per-image-seconds: give two numbers ROLLOUT,LEARN, e.g. 1,2.5; "
                                  f"got {args.per_image_seconds!r}") from None
            costs = planner.costs_per_image(rollout, learn, config, f"given per image: rollout {rollout:g} s, "
                                                                     f"learn {learn:g} s")
    print(planner.report(costs, args.gpus, config))
    if args.compare:
        print(planner.compare(costs, args.compare)[0])
    return 0


def _scale(args) -> int:
    if args.rollout_workers < 1:
        print(f"flowgrpo: error: --rollout-workers: must be at least 1, got {args.rollout_workers}", file=sys.stderr)
        return 2
    import ray

    from services.controller import elastic

    address = args.cluster or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as err:
        print(f"flowgrpo: error: --cluster: no Ray cluster to join at {address} ({err}); give the job's address",
              file=sys.stderr)
        return 2
    try:
        elastic.request(args.run_dir, args.rollout_workers)
    except elastic.ScaleError as err:
        print(f"flowgrpo: error: {err}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(f"flowgrpo: asked the job in {args.run_dir} for {args.rollout_workers} rollout worker(s); they change "
          f"between iterations (rollout_workers in {args.run_dir / 'metrics.jsonl'})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if hasattr(args, "address") and loopback.starts_local_cluster(args.address):
        loopback.prepare()  # before anything imports Ray: the cluster it starts then listens on 127.0.0.1 only
    from common.models import quiet_libraries

    quiet_libraries()
    from common.config import ConfigError
    from common.lora import LoraLoadError
    from common.prompts import PromptFileError
    from services.controller.run_folder import RunFolderError

    try:
        if args.command == "train":
            return _train(args)
        if args.command == "make-tiny-model":
            from common.models import make_tiny_model

            path = make_tiny_model(args.directory, args.preset, args.seed)
            print(f"flowgrpo: tiny model ({args.preset}, seed {args.seed}) saved in {path}")
            return 0
        if args.command == "make-prompts":
            return _make_prompts(args)
        if args.command == "pretrain-toy":
            return _pretrain_toy(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "gpu-check":
            return _gpu_check(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "scale":
            return _scale(args)
        if args.command == "serve-reward":
            from common.config import check_scorer_name, load_config
            from services.reward.grpc_service import PortInUseError, run_server

            check_scorer_name(args.scorer, "--scorer")
            config = load_config(args.config, args.overrides)
            try:
                run_server(args.scorer, config.reward, host=args.host, port=args.port)
            except PortInUseError as err:
                print(f"flowgrpo: error: {err}", file=sys.stderr)
                return 2
            return 0
    except (ConfigError, PromptFileError, LoraLoadError, RunFolderError, FileNotFoundError) as err:
        print(f"flowgrpo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowgrpo: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
