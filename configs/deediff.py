"""DeeDiff (Tang et al., arXiv:2309.17074): timestep-aware uncertainty early exit for a U-ViT diffusion model.

Runbook
-------
Command (args: mnist | fashion_mnist | cifar10 | gpu | gpu_x0uem | smoke):
    ./launch.sh deediff:mnist --data_dir ../shared/data --outdir experiments/results/deediff-mnist
    ./launch.sh deediff:fashion_mnist --data_dir ../shared/data --outdir experiments/results/deediff-fashion_mnist
    ./launch.sh deediff:cifar10 --data_dir DIR   # for a GPU: half-width U-ViT-S layout, 100k steps (not run here)
    ./launch.sh deediff:gpu --data_dir DIR --outdir experiments/results/deediff-gpu              # one H200
    ./launch.sh deediff:gpu_x0uem --data_dir DIR --outdir experiments/results/deediff-gpu-x0uem  # UEM ablation
    ./launch.sh deediff:smoke        # CI: embedded MNIST, tiny everything, seconds of compute
    A finished training run is not retrained: rerun with --overwrite to re-evaluate from its final checkpoint.
Data: MNIST / Fashion-MNIST from --data_dir or $EEJAX_DATA_DIR (exact copies, ../shared/data); smoke uses the MNIST
    test split shipped in the package. Pixels scaled to [-1, 1].
Model: class-conditional U-ViT (time token + class token + 4x4 patches, a 7x7 grid), depth 7 (3 in / 1 mid / 3 out
    blocks, long skips), width 64, an exit after every layer through the shared output head (norm, linear, U-ViT's
    3x3 conv), one UEM per layer. Trained jointly with DeeDiff's loss L_simple + L_u + L_UAL (lambda = beta = 1)
    on the epsilon error; epsilon is predicted through a v-style output skip (eps = sqrt(ab) v + sqrt(1-ab) x_t,
    see eejax.models.diffusion.eps_from_output); cosine schedule over 1000 timesteps; AdamW 2e-3 warmup-cosine,
    batch 128, 10,000 steps; samples from the parameter EMA (0.999).
    Why the output skip: with the head predicting epsilon directly, this small U-ViT left ~2% white error in eps at
    t ~ 800 (x_0 = (x_t - sqrt(1-ab) eps) / sqrt(ab) amplifies it ~10x there), and DDIM gave speckle, not digits,
    still at step 2,500 of a 12,000-step run (runs kept out of the repo; see the closing note of issue 4).
Sampler: DDIM, 50 steps, eta 0, one compiled loop over steps with the engine's while loop inside each step.
Evaluation: a small CNN trained here on the same dataset gives 128-d features for a classifier-FID and KID (NOT
    Inception FID; comparable only within one table). Policies at matched average depth, at target layer ratios
    0.4 / 0.6 / 0.8: full depth; DeeDiff per-sample and batch-mean (threshold calibrated to the target on a separate
    calibration batch); uniform truncation; t-banded depth; two-depth switch, all matched to DeeDiff per-sample's
    average depth.
Hardware / wall-clock: 2-core CPU, no other jobs: 10,000 U-ViT steps in 4,684 s (about 2.1 steps/s), evaluation
    (calibration, 16 policies x 500 samples, timing) about 8 minutes. Results and an honest reading in
    experiments/results/deediff-mnist/ (README.md there).
Preflight (every arg): before any policy comparison the script computes and prints (a) the share of full-depth
    class-conditional samples the feature CNN labels with their class (>= 90% required) and (b) cFID(uniform
    truncation at 0.4 of the depth) / cFID(full) (>= 1.2 required: depth must matter); a failed gate is the first
    line of the report and makes the computed verdict "inconclusive at this scale" (eejax.eval.preflight). The
    mnist run in experiments/results/deediff-mnist predates the gates; by its numbers it fails both (24% of its
    samples labelled with their class, uniform at 3 of 7 layers within 0.3% of full-depth cFID).
gpu (issue 25, the depth-limited base; not run yet): MNIST, a U-ViT-S layout at width 128: depth 13 (6 in / 1 mid /
    6 out, long skips), patch 2 (196 patches + time and class tokens = 198 tokens), 4 heads, MLP 512. A base phase
    of 40,000 steps of plain DDPM on the last exit (batch 128, AdamW 1e-3 warmup-cosine, EMA 0.9999), then DeeDiff's
    fine-tune from the base EMA for 6,000 steps (15% more, AdamW 4e-4 as the paper's fine-tune; the paper fine-tunes
    a pretrained U-ViT for 200k steps at batch 512, see PAPERS-WAVE4.md). Evaluation: 5,000 samples x 2 noise
    seeds per policy (every policy sees the same noise per seed), baselines at DeeDiff per-sample's measured depth;
    the verdict compares DeeDiff per-sample with uniform truncation per seed. gpu_x0uem: the same with the
    x0-space UEM target (loss.uem_target="x0"), a labelled deviation from the paper.
    H200 wall-clock, an ESTIMATE (not measured): eejax.models.diffusion.flops gives 1.354 GFLOP per image forward
    (all 13 exits' heads included); a training step ~ 3 x forward x 128 = 0.52 TFLOP; 46,000 steps = 2.4e16 FLOP.
    At an assumed 10% of the H200's 989 TFLOP/s bf16 dense peak (the H200 run in gpu-results/h200-2026-12-04
    measured 17.6% for a ViT-B train step in bf16; this model is 6x narrower and runs in float32) that is ~4 min of
    training; sampling 17 policy runs x 2 seeds x 5,000 samples x 50 DDIM steps at ~0.7 of full depth ~ 8e15
    FLOP ~ 1.5 min, calibration ~ 10 s. With compilation of the samplers and per-step overheads a small model
    cannot hide, expect 10-20 minutes per arg; a device call of at most 10 minutes stops mid-way, and rerunning the
    same command resumes from the last checkpoint (every 2,000 steps), so split it across calls.
Expected shape: the UEM's exit depth falls as noise rises (large t exits early); at the same average depth, DeeDiff
    and the t-banded schedule beat uniform truncation in FID-proxy. At our scale the first holds and the second does
    not (uniform truncation wins; see experiments/results/deediff-mnist/README.md).
Paper: U-ViT-S on CIFAR-10, full-depth FID 3.11; DeeDiff reports over 40% less inference computation at a similar
    FID (arXiv:2309.17074; numbers as quoted in the eejax issue).
"""
import ml_collections

from _base_vision import check_image, validate_vision
from eejax.train import default_optim_config

# Not compared with the workdir's recorded config: sampling and evaluation settings only, so a finished run can be
# re-evaluated with other values (eejax.harness.run.open_workdir).
NOT_IN_CHECKPOINTS = ("eval", "sample")


def get_config(arg=None):
    arg = arg or "mnist"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"deediff-{arg}"
    c.seed = 0

    c.data = ml_collections.ConfigDict(dict(name="mnist", train_size=0, ref_size=0))  # 0 = whole split
    c.model = ml_collections.ConfigDict(dict(image_size=28, channels=1, patch_size=4, d_model=64, depth=7,
                                             num_heads=4, mlp_dim=128, num_classes=10))
    # parameterization "v": the head's output is read as v and eps = sqrt(ab) v + sqrt(1 - ab) x_t (an output skip);
    # the loss is DeeDiff's epsilon loss either way. "eps" (head = epsilon) gave speckled samples at this scale.
    c.diffusion = ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=1000, parameterization="v"))
    # uem_target "eps": the paper's pseudo uncertainty on the epsilon error (Eq. 6); "x0": the labelled ablation on
    # the implied clean image's error (eejax.models.diffusion.deediff_loss).
    c.loss = ml_collections.ConfigDict(dict(lam=1.0, beta=1.0, detach_ual_weight=True, uem_target="eps"))
    # base.steps > 0: plain DDPM training of the last exit first (the converged U-ViT DeeDiff fine-tunes), then
    # train.steps of DeeDiff's loss from it; 0: DeeDiff's loss from scratch (the earlier runs).
    c.base = ml_collections.ConfigDict(dict(steps=0, optim=default_optim_config()))
    c.train = ml_collections.ConfigDict(dict(steps=10000, batch_size=128, optim=default_optim_config()))
    c.train.optim.update(lr=2e-3, schedule="warmup_cosine", warmup_steps=200, total_steps=10000, weight_decay=0.0,
                         grad_clip=1.0, ema_decay=0.999)
    c.classifier = ml_collections.ConfigDict(dict(steps=400, batch_size=128, optim=default_optim_config()))
    c.classifier.optim.update(lr=2e-3)

    # seeds: evaluation noise seeds per policy (every policy sees the same noise per seed), num_samples each.
    c.sample = ml_collections.ConfigDict(dict(steps=50, eta=0.0, num_samples=500, batch_size=250, clip=True,
                                              seeds=1))
    c.eval = ml_collections.ConfigDict(dict(
        target_ratios=(0.4, 0.6, 0.8),  # DeeDiff thresholds are calibrated so that layers / N is about this
        calib_iters=6,                # bisection steps of that calibration (on a separate batch of noise)
        two_depth_shallow=2,          # the shallow depth of the two-depth switch
        mse_images=256, mse_timesteps=(0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999),
        kid_subsets=20, kid_subset_size=250, grid=100, timing_repeats=1,
        # Gates printed before any policy comparison (eejax.eval.preflight): (a) the feature CNN labels >= min_acc
        # of full-depth samples with their class; (b) cFID(uniform at `ratio` of the depth) >= min_cfid_ratio x
        # cFID(full). A failed gate makes the computed verdict "inconclusive at this scale".
        preflight=ml_collections.ConfigDict(dict(ratio=0.4, min_acc=0.9, min_cfid_ratio=1.2))))
    c.log_every = 100
    c.ckpt_every = 500

    if arg == "fashion_mnist":
        c.data.name = "fashion_mnist"
    elif arg == "cifar10":
        # For a GPU (not run on the 2-core CPU): the JPEG q75 copy of CIFAR-10 (not exact), a U-ViT-S-like
        # layout at half width (depth 13, width 256, patch 2 -> 256 tokens), linear schedule as U-ViT uses.
        c.data.name = "cifar10"
        c.model.update(image_size=32, channels=3, patch_size=2, d_model=256, depth=13, num_heads=4, mlp_dim=1024)
        c.diffusion.schedule = "linear"
        c.train.update(steps=100_000, batch_size=128)
        c.train.optim.update(lr=2e-4, warmup_steps=5000, total_steps=100_000, weight_decay=0.03, ema_decay=0.9999)
        c.classifier.steps = 3000
        c.sample.update(num_samples=5000, batch_size=500)
        c.eval.kid_subset_size = 1000
        c.ckpt_every = 5000
    elif arg in ("gpu", "gpu_x0uem"):
        # The depth-limited base of issue 25 (one H200; see the runbook): a U-ViT-S layout at width 128 on MNIST,
        # 13 layers (6 in / 1 mid / 6 out, long skips), patch 2 (196 patches + time + class tokens); a base phase
        # of plain DDPM to convergence, then DeeDiff's fine-tune for 15% more steps at the paper's lr 4e-4;
        # 5,000 samples x 2 noise seeds per policy. gpu_x0uem: the same with the x0-space UEM target (ablation).
        c.model.update(patch_size=2, d_model=128, depth=13, num_heads=4, mlp_dim=512)
        c.base.steps = 40_000
        c.base.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=1000, total_steps=40_000,
                            weight_decay=0.03, grad_clip=1.0, ema_decay=0.9999)
        c.train.steps = 6000
        c.train.optim.update(lr=4e-4, schedule="warmup_cosine", warmup_steps=200, total_steps=6000,
                             weight_decay=0.03, grad_clip=1.0, ema_decay=0.999)
        c.classifier.steps = 1000
        c.sample.update(num_samples=5000, batch_size=500, seeds=2)
        c.eval.update(kid_subset_size=1000, timing_repeats=2)
        c.ckpt_every = 2000
        if arg == "gpu_x0uem":
            c.loss.uem_target = "x0"
    elif arg == "smoke":
        c.data.name = "mnist_embedded"
        c.model.update(patch_size=7, d_model=32, depth=3, mlp_dim=64)
        c.train.steps = c.train.optim.total_steps = 20
        c.train.optim.update(warmup_steps=5, ema_decay=0.9)
        c.train.batch_size = 32
        c.classifier.steps = 20
        c.classifier.batch_size = 32
        c.sample.update(steps=4, num_samples=40, batch_size=20)
        c.eval.update(target_ratios=(0.5, 0.8), calib_iters=2, mse_images=16, mse_timesteps=(0, 500, 999),
                      kid_subsets=2, kid_subset_size=20, grid=20, timing_repeats=1)
        c.log_every = 10
        # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps, c.classifier.steps, c.sample.num_samples = 6, 4, 20
        c.base.steps = 2                 # exercises the base phase + fine-tune path
        c.base.optim.update(warmup_steps=1, total_steps=2)
    elif arg != "mnist":
        raise ValueError(f"configs/deediff.py: unknown arg {arg!r}; use mnist, fashion_mnist, cifar10, gpu, "
                         "gpu_x0uem or smoke")
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.models import diffusion as D  # noqa: PLC0415

    v = validate_vision(c, sizes=("data.train_size", "data.ref_size"), positive=(
        "model.image_size", "model.channels", "model.patch_size", "model.d_model", "model.depth",
        "model.num_heads", "model.mlp_dim", "diffusion.num_timesteps", "train.steps", "train.batch_size",
        "classifier.steps", "classifier.batch_size", "sample.steps", "sample.num_samples",
        "sample.batch_size", "eval.calib_iters", "eval.mse_images", "eval.kid_subsets",
        "eval.kid_subset_size", "eval.grid", "eval.timing_repeats", "log_every", "ckpt_every"))
    v.int("model.num_classes", lo=0)
    check_image(v, c)
    mcfg = v.build("config.model", lambda: D.UViTConfig(**c.model.to_dict()))
    v.choice("diffusion.schedule", ("linear", "cosine"))
    v.choice("diffusion.parameterization", ("eps", "v"))
    v.float("loss.lam", lo=0.0)
    v.float("loss.beta", lo=0.0)
    v.bool("loss.detach_ual_weight")
    v.choice("loss.uem_target", D.UEM_TARGETS)
    v.int("base.steps", lo=0)
    v.optim("base.optim")
    v.optim("train.optim")
    v.optim("classifier.optim")
    v.int("sample.steps", lo=1, hi=c.diffusion.num_timesteps)
    v.float("sample.eta", 0.0, 1.0)   # DDIM's eta: 0 deterministic ... 1 DDPM's variance
    if c.eval.kid_subset_size > c.sample.num_samples:
        v.fail("eval.kid_subset_size", f"must be <= sample.num_samples={c.sample.num_samples} (KID subsets are "
                                       "drawn from the samples)")
    if c.data.ref_size and c.data.ref_size < max(c.sample.num_samples, c.eval.kid_subset_size):
        v.fail("data.ref_size", f"must be 0 (the whole test split) or >= sample.num_samples="
                                f"{c.sample.num_samples}: the cFID/KID reference set must not be smaller than the "
                                "generated one")
    v.bool("sample.clip")
    v.int("sample.seeds", lo=1)
    v.float("eval.preflight.ratio", 0.0, 1.0, lo_open=True, hi_open=True)
    v.float("eval.preflight.min_acc", 0.0, 1.0, lo_open=True)
    v.float("eval.preflight.min_cfid_ratio", lo=1.0)
    v.floats("eval.target_ratios", 0.0, 1.0, lo_open=True)  # layers / N: (0, 1]
    v.int("eval.two_depth_shallow", lo=1, hi=mcfg.depth)
    v.ints("eval.mse_timesteps", lo=0, hi=c.diffusion.num_timesteps - 1, unique=True)
