"""The one parameter schema: every name, type, default, limit and help text lives here.

index.json's `parameters` and `parameters_ui` are generated from this class
(`python -m diffusion_trainer.lab.manifest`), and a test proves the two agree.
`parse_params` is the only way parameters enter the program: it coerces the
strings the Lab sends, accepts the keys its caller expects (the Lab's bookkeeping), warns about unknown
keys (suggesting the nearest known one) and reports every bad value at once.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

# Why an adaptor name must be this plain: the Lab loads adapters from
# adaptors/<model>/<secure_filename(adaptor_name)>, so any name that sanitising
# would change is written to one folder and looked for in another.
ADAPTOR_NAME_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9-])?$")
DEFAULT_OUTPUT_DIR = "./output"


def _param(default: Any = ..., *, title: str, help: str, group: str, lab_form: bool = True,
           widget: str | None = None, **limits: Any) -> Any:
    extra: dict[str, Any] = {"group": group, "lab_form": lab_form}
    if widget:
        extra["widget"] = widget
    return Field(default, title=title, description=help, json_schema_extra=extra, **limits)


class TrainingParams(BaseModel):
    """Everything a run can be told. Frozen: nothing rewrites a parameter mid-run."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, protected_namespaces=(),
                              allow_inf_nan=False)

    # --- Run -----------------------------------------------------------------------------
    adaptor_name: str = _param(
        title="Adaptor Name", group="Run", max_length=128,
        help="Name of the LoRA adaptor to create. Letters, digits, '.', '_' and '-' only; "
             "it becomes the adaptor's folder name.")
    trigger_word: str = _param(
        "", title="Trigger Word", group="Run",
        help="Optional word put in front of every caption (e.g. 'sks'), so prompts can call up "
             "what the adaptor learned.")
    model_name: str = _param(
        title="Base Model", group="Run", lab_form=False,
        help="Hub id or local folder of a diffusers pipeline (model_index.json), e.g. "
             "'stable-diffusion-v1-5/stable-diffusion-v1-5'.")
    dataset_name: str = _param(
        title="Dataset", group="Run", lab_form=False,
        help="Hub id, a folder saved with datasets' save_to_disk, an imagefolder with "
             "metadata.jsonl, or a folder of images with same-named .txt captions (see caption_extension "
             "and default_caption), with kohya-style subfolders <repeats>_<name> if you like.")
    output_dir: str = _param(
        DEFAULT_OUTPUT_DIR, title="Output Directory", group="Run", lab_form=False,
        help="Where a standalone run writes the adaptor, eval images and logs. Empty = ./output.")
    seed: int = _param(
        42, title="Seed", group="Run", ge=0, le=2**32 - 1,
        help="Random seed for noise, timesteps, augmentation and eval images.")
    num_train_epochs: int = _param(
        100, title="Number of Training Epochs", group="Run", ge=1, le=1000,
        help="Passes over the dataset.")
    max_train_steps: int = _param(
        0, title="Max Training Steps", group="Run", ge=0,
        help="Train exactly this many optimizer steps, as diffusers' scripts do: it overrides "
             "num_train_epochs (more epochs when needed, or a stop mid-epoch). 0 = use num_train_epochs.")
    train_batch_size: int = _param(
        1, title="Train Batch Size", group="Run", ge=1, le=1024,
        help="Images per batch on each device.")
    gradient_accumulation_steps: int = _param(
        1, title="Gradient Accumulation Steps", group="Run", ge=1, le=32,
        help="Batches whose gradients are summed before each optimizer step; the effective "
             "batch is train_batch_size x this x the number of GPUs (processes).")

    # --- Data ----------------------------------------------------------------------------
    caption_column: str = _param(
        "text", title="Caption Column", group="Data", min_length=1,
        help="Dataset column holding each image's caption.")
    caption_extension: Literal[".txt", ".caption"] = _param(
        ".txt", title="Caption File Extension", group="Data",
        help="In a folder of images, the caption files read beside them: '.txt' or '.caption' (kohya's); "
             "files with the other extension are not read.")
    default_caption: str = _param(
        "", title="Default Caption", group="Data",
        help="In a folder of images, the caption of every image without a caption file (the trigger "
             "word still goes in front). Empty = such images get the trigger word alone, or, without "
             "one, the folder is refused.")
    dataset_repeats: int = _param(
        1, title="Dataset Repeats", group="Data", ge=1, le=10_000,
        help="Each image is trained this many times an epoch (each time a new draw of the "
             "augmentation). In a kohya-style folder (subfolders named <repeats>_<name>, e.g. "
             "'10_sks dog') it multiplies each subfolder's own repeats.")
    image_column: str = _param(
        "image", title="Image Column", group="Data", min_length=1,
        help="Dataset column holding the images.")
    caption_dropout_rate: float = _param(
        0.0, title="Caption Dropout Rate", group="Data", ge=0.0, le=1.0,
        help="Chance of training a sample with an empty caption, which keeps classifier-free "
             "guidance working. 1.0 trains without captions.")
    shuffle_caption: bool = _param(
        False, title="Shuffle Caption Tags", group="Data",
        help="Each time a caption is used, shuffle its comma-separated tags. The first keep_tokens "
             "tags stay in place, and the trigger word stays first. With cache_text_embeddings, "
             "shuffled captions are encoded as drawn (the text encoder stays on the accelerator).")
    keep_tokens: int = _param(
        0, title="Keep Tokens", group="Data", ge=0,
        help="How many leading comma-separated tags (after the trigger word) shuffle_caption and "
             "caption_tag_dropout_rate leave in place.")
    caption_tag_dropout_rate: float = _param(
        0.0, title="Caption Tag Dropout Rate", group="Data", ge=0.0, le=1.0,
        help="Chance of dropping each comma-separated tag (except the first keep_tokens and the "
             "trigger word) each time a caption is used. 0 keeps every tag.")
    resolution: int = _param(
        512, title="Image Resolution", group="Data", ge=64, le=2048,
        help="Training images are resized and cropped to this square size (a multiple of 8; "
             "16 for SD3, Flux, Chroma, Z-Image and Qwen-Image).")
    center_crop: bool = _param(
        False, title="Center Crop", group="Data",
        help="Crop the centre of each resized image; off crops at a random place.")
    image_interpolation_mode: Literal["lanczos", "bilinear", "bicubic", "nearest"] = _param(
        "lanczos", title="Image Interpolation Mode", group="Data",
        help="Filter used when resizing images.")

    skip_bad_images: bool = _param(
        False, title="Skip Bad Images", group="Data",
        help="Train without the images (and rows) that cannot be used: broken, truncated, not images, "
             "over 100 megapixels, or with an unreadable caption. Off: such a dataset is refused, "
             "every bad file named.")
    allow_files_outside_dataset: bool = _param(
        False, title="Allow Files Outside the Dataset Folder", group="Data",
        help="Follow symlinks (and metadata paths) that lead out of the dataset folder. Off: such "
             "files are refused.")

    # --- Prior preservation --------------------------------------------------------------
    class_data_dir: str = _param(
        "", title="Class Images Folder", group="Prior preservation",
        help="Prior preservation (DreamBooth): a folder of class images (e.g. other dogs), in any "
             "layout the dataset folder may have, outside the dataset folder. When it holds fewer "
             "than num_class_images, the base model draws the missing ones from class_prompt before "
             "training and keeps them there. Empty = no prior preservation.")
    class_prompt: str = _param(
        "", title="Class Prompt", group="Prior preservation",
        help="The class images' caption (e.g. 'a photo of a dog'), and what the missing ones are drawn "
             "from; class images with a caption of their own keep it. Required with class_data_dir.")
    prior_loss_weight: float = _param(
        1.0, title="Prior Loss Weight", group="Prior preservation", ge=0.0, le=100.0,
        help="The loss is instance loss + this x class-image loss. 0 = prior preservation off "
             "(class_data_dir is then not read).")
    num_class_images: int = _param(
        100, title="Number of Class Images", group="Prior preservation", ge=1, le=100000,
        help="How many class images training uses at least; missing ones are drawn with the base model "
             "(no LoRA) at the run's resolution, seed, eval_num_inference_steps and eval_guidance_scale.")

    # --- Augmentation --------------------------------------------------------------------
    random_flip: bool = _param(
        False, title="Random Horizontal Flip", group="Augmentation",
        help="Mirror half of the images. Leave off for text, logos or asymmetric subjects.")
    color_jitter: bool = _param(
        False, title="Enable Color Jitter", group="Augmentation",
        help="Randomly vary brightness, contrast, saturation and hue by the amounts below.")
    color_jitter_brightness: float = _param(
        0.1, title="Color Jitter Brightness", group="Augmentation", ge=0.0, le=1.0,
        help="Brightness varies by up to this fraction.")
    color_jitter_contrast: float = _param(
        0.1, title="Color Jitter Contrast", group="Augmentation", ge=0.0, le=1.0,
        help="Contrast varies by up to this fraction.")
    color_jitter_saturation: float = _param(
        0.1, title="Color Jitter Saturation", group="Augmentation", ge=0.0, le=1.0,
        help="Saturation varies by up to this fraction.")
    color_jitter_hue: float = _param(
        0.05, title="Color Jitter Hue", group="Augmentation", ge=0.0, le=0.5,
        help="Hue shifts by up to this fraction of the colour wheel.")
    random_rotation: bool = _param(
        False, title="Enable Random Rotation", group="Augmentation",
        help="Rotate some images by a small random angle.")
    rotation_degrees: float = _param(
        5, title="Random Rotation Degrees", group="Augmentation", ge=0, le=180,
        help="Largest rotation, in degrees, either way.")
    rotation_prob: float = _param(
        0.3, title="Random Rotation Probability", group="Augmentation", ge=0.0, le=1.0,
        help="Chance that an image is rotated.")

    # --- LoRA ----------------------------------------------------------------------------
    lora_r: int = _param(
        8, title="LoRA Rank (r)", group="LoRA", ge=1, le=256, widget="RangeWidget",
        help="Rank of the LoRA matrices: more capacity and a bigger file as it grows.")
    lora_alpha: int = _param(
        16, title="LoRA Alpha", group="LoRA", ge=1, le=512, widget="RangeWidget",
        help="LoRA scale numerator: the update is scaled by alpha / r. Saved with the adaptor.")

    lora_layers: Literal["default", "attention", "attention+mlp", "all-linear"] = _param(
        "default", title="LoRA Layers", group="LoRA",
        help="Which denoiser layers get LoRA: 'attention' (the attention projections), "
             "'attention+mlp' (and the feed-forward layers), 'all-linear' (every linear layer). "
             "'default' is each family's reference recipe: attention+mlp for Flux and Chroma, "
             "attention for the others. The adaptor info records the layers used.")
    lora_type: Literal["lora", "dora", "lokr", "loha"] = _param(
        "lora", title="Adapter Type", group="LoRA",
        help="'lora' (plain LoRA); 'dora' (weight-decomposed LoRA: a learned magnitude per output row); "
             "'lokr' (LyCORIS LoKr, a Kronecker product); 'loha' (LyCORIS LoHa, a Hadamard product), all "
             "through peft. diffusers' load_lora_weights reads lora and dora; ComfyUI reads all four from the "
             "single file (dora with a dora_scale computed from the base weights); AUTOMATIC1111 misreads dora "
             "(see the README's table).")
    lora_dropout: float = _param(
        0.0, title="LoRA Dropout", group="LoRA", ge=0.0, lt=1.0,
        help="Dropout on the adapter's input while training (lora, dora), or on its rank (lokr, loha). "
             "0 = none.")
    lora_init: Literal["gaussian", "default", "pissa", "olora"] = _param(
        "gaussian", title="LoRA Initialisation", group="LoRA",
        help="How a lora/dora adapter starts: 'gaussian' (A Gaussian, B zero, as diffusers' scripts), "
             "'default' (peft's own: A Kaiming-uniform, B zero), 'pissa' or 'olora' (lora only: A and B "
             "from the base weights' principal / orthonormal part, which is taken out of the base; the "
             "saved adapter is converted to a rank-2r LoRA that loads on the original base model). "
             "lokr and loha start their own way ('gaussian' or 'default').")
    train_text_encoder: bool = _param(
        False, title="Train Text Encoder", group="LoRA",
        help="Also put an adapter on the CLIP text encoders (SD 1.x/2.x: one; SDXL and SD3: both CLIP; "
             "Flux: CLIP-L; never T5). Their captions are then encoded every step (the text cache keeps "
             "only the frozen encoders', e.g. T5).")
    text_encoder_lr: float = _param(
        0.0, title="Text Encoder Learning Rate", group="LoRA", ge=0.0, le=1.0,
        help="Learning rate of the text-encoder adapter. 0 = learning_rate.")
    text_encoder_lora_layers: Literal["attention", "attention+mlp"] = _param(
        "attention", title="Text Encoder LoRA Layers", group="LoRA",
        help="Which text-encoder layers get the adapter: 'attention' (q, k, v, out projections, as "
             "diffusers' scripts) or 'attention+mlp' (and fc1, fc2).")

    # --- Optimizer -----------------------------------------------------------------------
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = _param(
        "adamw", title="Optimizer", group="Optimizer",
        help="'adamw' (torch's); 'adamw8bit' (bitsandbytes' 8-bit states, less memory; CUDA or CPU); 'prodigy' "
             "(finds its own step size: set learning_rate to 1.0); 'adafactor' (transformers', "
             "little memory). All take adam_weight_decay; the Adam settings apply to the AdamW "
             "kinds and prodigy.")
    learning_rate: float = _param(
        1e-4, title="Learning Rate", group="Optimizer", gt=0.0, le=1.0,
        help="Learning rate for the LoRA weights (for prodigy a multiplier of its own estimate: "
             "1.0).")
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = _param(
        "constant", title="LR Scheduler", group="Optimizer",
        help="How the learning rate changes over the run. 'constant' has no warmup.")
    lr_warmup_steps: int = _param(
        50, title="LR Warmup Steps", group="Optimizer", ge=0,
        help="Optimizer steps over which the learning rate ramps up from 0 (not used by "
             "'constant').")
    adam_beta1: float = _param(
        0.9, title="Adam Beta 1", group="Optimizer", ge=0.0, lt=1.0,
        help="AdamW first-moment decay.")
    adam_beta2: float = _param(
        0.999, title="Adam Beta 2", group="Optimizer", ge=0.0, lt=1.0,
        help="AdamW second-moment decay.")
    adam_weight_decay: float = _param(
        0.01, title="Adam Weight Decay", group="Optimizer", ge=0.0, le=1.0,
        help="AdamW decoupled weight decay.")
    adam_epsilon: float = _param(
        1e-8, title="Adam Epsilon", group="Optimizer", gt=0.0, le=1e-2,
        help="AdamW numerical-stability term.")
    max_grad_norm: float = _param(
        1.0, title="Max Grad Norm", group="Optimizer", ge=0.0,
        help="Gradients are clipped to this total norm before each step. 0 = no clipping.")

    # --- Loss ----------------------------------------------------------------------------
    loss_type: Literal["l2", "huber"] = _param(
        "l2", title="Loss Type", group="Loss",
        help="'l2' is the usual mean squared error; 'huber' is the pseudo-Huber loss, "
             "gentler on outliers.")
    masked_loss: bool = _param(
        False, title="Masked Loss", group="Loss",
        help="Train only where each image's mask is white: a same-named image in a masks/ folder "
             "beside it (dog.jpg -> masks/dog.png), else its alpha channel (opaque trains). Images "
             "without a mask train on the whole image (they are named); none at all is refused. Class "
             "images (prior preservation) train on the whole image.")
    huber_c: float = _param(
        0.1, title="Huber Loss Beta", group="Loss", gt=0.0, le=10.0,
        help="Pseudo-Huber c: errors much smaller than c are treated as squared, larger as "
             "absolute.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = _param(
        "auto", title="Prediction Type", group="Loss",
        help="What the UNet learns to predict (SD 1.x/2.x, SDXL). 'auto' is the model's own (its "
             "scheduler config: v_prediction for SD 2.x-768, epsilon for most others); a different "
             "choice is trained as asked, with a warning.")
    snr_gamma: float = _param(
        0, title="SNR Gamma", group="Loss", ge=0.0, le=100.0,
        help="Min-SNR-gamma loss weighting (Hang et al. 2023); 5 is the paper's value. "
             "0 = off.")
    min_snr_gamma: float = _param(
        0, title="Min-SNR Gamma", group="Loss", ge=0.0, le=100.0,
        help="The same Min-SNR-gamma weighting under kohya's name; set this or snr_gamma. "
             "0 = off.")
    noise_offset: float = _param(
        0, title="Noise Offset", group="Loss", ge=0.0, le=1.0,
        help="Adds this much per-channel constant noise, so the model can learn very dark or "
             "bright images. 0.05-0.1 is typical.")

    # --- Flow matching (SD3, Flux) -------------------------------------------------------
    weighting_scheme: Literal["logit_normal", "uniform", "mode"] = _param(
        "logit_normal", title="Timestep Sampling", group="Flow matching (SD3, Flux)",
        help="How noise levels are drawn for flow models: 'logit_normal' (the SD3 paper's choice) "
             "favours the middle, 'mode' too with mode_scale, 'uniform' draws all alike.")
    logit_mean: float = _param(
        0.0, title="Logit-Normal Mean", group="Flow matching (SD3, Flux)", ge=-5.0, le=5.0,
        help="Mean of the logit-normal draw; above 0 trains more on noisy images.")
    logit_std: float = _param(
        1.0, title="Logit-Normal Std", group="Flow matching (SD3, Flux)", gt=0.0, le=10.0,
        help="Spread of the logit-normal draw.")
    mode_scale: float = _param(
        1.29, title="Mode Scale", group="Flow matching (SD3, Flux)", ge=-1.0, le=1.75,
        help="Scale of the 'mode' draw (SD3 paper); 0 is uniform, higher favours the middle.")
    flow_loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = _param(
        "none", title="Flow Loss Weighting", group="Flow matching (SD3, Flux)",
        help="Loss weight by noise level for flow models, as diffusers defines them: 'none', "
             "'sigma_sqrt' (1/sigma^2) or 'cosmap'.")
    guidance_scale: float = _param(
        1.0, title="Flux Training Guidance", group="Flow matching (SD3, Flux)", ge=0.0, le=20.0,
        help="Guidance value fed to a guidance-distilled Flux model (FLUX.1-dev, FLUX.2-dev) while training; "
             "1.0 as the reference LoRA recipes use. Eval images use eval_guidance_scale.")

    max_sequence_length: int = _param(
        77, title="SD3 T5 Prompt Length", group="Flow matching (SD3, Flux)", ge=1, le=512,
        help="Tokens of SD3's T5 prompt embedding (77 as diffusers' SD3 LoRA recipe), and, for an "
             "SD3 model saved without T5, the number of zero tokens that stand in for it. Sample the "
             "adaptor with the same max_sequence_length (eval images do). Flux uses 512.")

    # --- Caching and speed ---------------------------------------------------------------
    cache_latents: bool = _param(
        True, title="Cache Latents", group="Caching and speed",
        help="Encode each training image with the VAE once and train on the stored latents (the VAE "
             "then leaves the GPU until eval images). Off: encode every step.")
    latent_cache_variants: int = _param(
        4, title="Cached Augmentation Variants", group="Caching and speed", ge=1, le=64,
        help="With random augmentation (random crop of non-square images, colour jitter, rotation), "
             "this many augmented versions of each image are cached and one is drawn per epoch. For "
             "fresh augmentation every step, turn cache_latents off.")
    cache_text_embeddings: bool = _param(
        True, title="Cache Text Embeddings", group="Caching and speed",
        help="Encode each distinct caption (and the empty one) once; the text encoders then leave the "
             "GPU, or are freed when there is no eval prompt.")
    cache_memory_budget_mb: int = _param(
        2048, title="Latent Cache Memory Budget (MB)", group="Caching and speed", ge=0,
        help="A latent cache larger than this goes to disk under output_dir/cache, where later runs "
             "with the same model, data, resolution and augmentation reuse it. 0 = always on disk.")
    aspect_ratio_bucketing: bool = _param(
        False, title="Aspect Ratio Bucketing", group="Caching and speed",
        help="Train each image at its own shape: buckets of about resolution x resolution pixels with "
             "sides in multiples of 64, one bucket per batch. Off: square crops.")
    torch_compile: bool = _param(
        False, title="torch.compile the Denoiser", group="Caching and speed",
        help="Compile the UNet/transformer with torch.compile: slower start, faster steps on GPUs.")
    mixed_precision: Literal["no", "fp16", "bf16"] = _param(
        "no", title="Mixed Precision", group="Caching and speed",
        help="Keep the frozen base model in half precision (LoRA weights stay fp32). fp16 needs "
             "a GPU; bf16 needs a recent GPU or works slowly on CPU.")
    enable_xformers_memory_efficient_attention: bool = _param(
        False, title="Enable xFormers Memory Efficient Attention", group="Caching and speed",
        help="Use xFormers attention (CUDA only; ignored with a warning elsewhere). PyTorch's "
             "own SDPA attention is used otherwise.")
    gradient_checkpointing: bool = _param(
        False, title="Enable Gradient Checkpointing", group="Caching and speed",
        help="Recompute activations in the backward pass: much less memory, about 20-30% "
             "slower.")

    # --- Memory --------------------------------------------------------------------------
    base_precision: Literal["auto", "fp32", "bf16", "fp16", "fp8", "int8", "nf4"] = _param(
        "auto", title="Base Model Storage", group="Memory",
        help="How the frozen base model is stored on the GPU (the LoRA and its optimizer stay fp32): "
             "fp8 is stored in 8 bits and computed in bf16 (diffusers' layerwise casting), int8 "
             "(torchao) and nf4 (bitsandbytes) are quantized while loading. auto = the memory plan "
             "picks the least lossy storage that fits the GPU (as mixed_precision without a GPU).")
    offload: Literal["auto", "none", "blocks"] = _param(
        "auto", title="Offload the Denoiser", group="Memory",
        help="blocks = keep the frozen weights of the denoiser's blocks in host memory and copy each "
             "block to the GPU as it runs (slower steps, far less GPU memory; turns gradient "
             "checkpointing on). auto = only when nothing else fits.")
    gpu_memory_gb: float = _param(
        0.0, title="GPU Memory Budget (GB)", group="Memory", ge=0.0,
        help="The GPU memory the memory plan must fit in. 0 = the GPU's free memory when the run starts.")

    # --- EMA -----------------------------------------------------------------------------
    use_ema: bool = _param(
        False, title="Use EMA (Exponential Moving Average)", group="EMA",
        help="Keep an exponential moving average of the LoRA weights; the average is what gets "
             "saved and used for eval images.")
    ema_decay: float = _param(
        0.9999, title="EMA Decay Rate", group="EMA", ge=0.5, lt=1.0,
        help="Weight kept from the average at each step (ramped up from 0 early in the run). "
             "Closer to 1 averages over more steps.")

    # --- Evaluation ----------------------------------------------------------------------
    eval_prompt: str = _param(
        "", title="Evaluation Prompts", group="Evaluation", widget="textarea",
        help="Prompts drawn with the adaptor before step 1, during training and at the end: one per line, "
             "or separated by '|' on one line (with line breaks, each line is one prompt and '|' is kept "
             "as written). Empty = no eval images.")
    eval_num_images: int = _param(
        1, title="Evaluation Images per Prompt", group="Evaluation", ge=1, le=16,
        help="Each eval prompt is drawn at this many fixed seeds (seed, seed + 1, ...); each eval also "
             "writes one grid of prompts (rows) x seeds (columns).")
    eval_steps: int = _param(
        1, title="Evaluation Every N Epochs", group="Evaluation", ge=1,
        help="Evaluate (eval images, validation loss) every this many epochs, before step 1 and at "
             "the end. Counts epochs, not steps (see eval_every_n_steps).")
    eval_every_n_steps: int = _param(
        0, title="Evaluation Every N Steps", group="Evaluation", ge=0,
        help="Also evaluate every this many optimizer steps. 0 = off (only every eval_steps epochs).")
    eval_also_without_ema: bool = _param(
        False, title="Eval Images Also Without EMA", group="Evaluation",
        help="With use_ema, eval images use the averaged weights; this also draws them with the "
             "weights as trained (files and grids ending in _no_ema).")
    validation_split: float = _param(
        0.0, title="Validation Split", group="Evaluation", ge=0.0, lt=1.0,
        help="Hold out this fraction of the dataset (at least one image), never trained on: its loss at "
             "fixed timesteps and fixed noise is computed at every eval, logged as val/loss, written to "
             "metrics.json and reported as the job's score. The same images are held out whatever the "
             "seed. 0 = off.")
    eval_num_inference_steps: int = _param(
        50, title="Evaluation Inference Steps", group="Evaluation", ge=1, le=200,
        help="Denoising steps per eval image.")
    eval_guidance_scale: float = _param(
        0.0, title="Evaluation Guidance Scale", group="Evaluation", ge=0.0, le=30.0,
        help="Guidance for eval images; higher follows the prompt more closely. 0 = the model's "
             "own pipeline default (7.5 for SD 1.x/2.x, 5.0 SDXL, 7.0 SD3, 3.5 Flux, 4.0 FLUX.2; "
             "guidance-distilled models, FLUX.1-dev and FLUX.2-dev, take it as their guidance input; 5.0 Chroma and "
             "Z-Image, none for Qwen-Image, where a value is its true_cfg_scale with a blank negative prompt).")

    # --- Logging -------------------------------------------------------------------------
    log_to_wandb: bool = _param(
        True, title="Log to Weights and Biases", group="Logging",
        help="Also log to W&B when it is configured (WANDB_API_KEY, or WANDB_MODE=offline). "
             "TensorBoard logs are always written.")

    # --- Checkpoints ---------------------------------------------------------------------
    checkpointing_steps: int = _param(
        500, title="Checkpointing Steps", group="Checkpoints", ge=0,
        help="Save a checkpoint (LoRA, optimizer, scheduler, EMA, RNG states, position in the data) "
             "every this many optimizer steps, at the end, and when the run is stopped, so it can be "
             "resumed exactly. 0 = off.")
    checkpoints_total_limit: int = _param(
        3, title="Checkpoints Total Limit", group="Checkpoints", ge=0,
        help="Keep only the newest this many checkpoints. 0 = keep all.")
    resume_from_checkpoint: str = _param(
        "", title="Resume From Checkpoint", group="Checkpoints",
        help="Empty = start fresh; 'latest' = the newest checkpoint of this adaptor_name under "
             "output_dir; or the path of one checkpoint folder. Only more steps or epochs, eval and "
             "logging settings may differ from the checkpoint's run.")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in (int, float):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        return value

    @field_validator("output_dir")
    @classmethod
    def _default_when_blank(cls, output_dir: str) -> str:
        return output_dir if output_dir.strip() else DEFAULT_OUTPUT_DIR  # a form sends "" for unset

    @field_validator("adaptor_name")
    @classmethod
    def _safe_adaptor_name(cls, name: str) -> str:
        if name in {".", ".."} or not ADAPTOR_NAME_PATTERN.match(name):
            raise ValueError(
                "must be a plain folder name: letters, digits, '.', '_' or '-', starting with a "
                "letter or digit and not ending in '.' or '_' (no spaces, slashes or '..')")
        from .outputs.layout import RESERVED_NAMES

        if name.lower() in RESERVED_NAMES:
            raise ValueError(f"'{name}' is the name of a folder the trainer keeps beside the adapters; reserved "
                             f"names: {', '.join(sorted(RESERVED_NAMES))}")
        return name

    @field_validator("model_name", "dataset_name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("required: a hub id or a local path")
        return value.strip()

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, resolution: int) -> int:
        if resolution % 8:
            raise ValueError(f"must be a multiple of 8 (e.g. {resolution - resolution % 8} or "
                             f"{resolution - resolution % 8 + 8})")
        return resolution

    @field_validator("image_column")
    @classmethod
    def _distinct_columns(cls, image_column: str, info: ValidationInfo) -> str:
        if image_column == info.data.get("caption_column"):
            raise ValueError("must differ from caption_column")
        return image_column

    @field_validator("class_prompt")
    @classmethod
    def _class_prompt_with_class_images(cls, class_prompt: str, info: ValidationInfo) -> str:
        if (info.data.get("class_data_dir") or "").strip() and not class_prompt.strip():
            raise ValueError("required when class_data_dir is set: the caption of the class images, and "
                             "what missing ones are drawn from (e.g. 'a photo of a dog')")
        return class_prompt.strip()

    @property
    def prior_preservation(self) -> bool:
        """Whether class images are trained beside the instance images."""
        return bool(self.class_data_dir.strip()) and self.prior_loss_weight > 0

    @field_validator("min_snr_gamma")
    @classmethod
    def _one_snr_gamma(cls, min_snr_gamma: float, info: ValidationInfo) -> float:
        snr_gamma = info.data.get("snr_gamma") or 0
        if snr_gamma and min_snr_gamma and snr_gamma != min_snr_gamma:
            raise ValueError(f"is the same weighting as snr_gamma ({snr_gamma}); set only one "
                             "of them, or both to the same value")
        return min_snr_gamma

    @field_validator("lora_init")
    @classmethod
    def _init_fits_type(cls, lora_init: str, info: ValidationInfo) -> str:
        lora_type = info.data.get("lora_type", "lora")
        if lora_init in {"pissa", "olora"} and lora_type != "lora":
            raise ValueError(f"'{lora_init}' applies to lora_type 'lora' only (got lora_type '{lora_type}'): it "
                             "moves part of the base weights into the adapter, which a "
                             f"{lora_type} adapter cannot be converted back from; choose gaussian or default")
        return lora_init

    @property
    def effective_snr_gamma(self) -> float:
        """The Min-SNR gamma in force, whichever of its two names set it (0 = off)."""
        return self.snr_gamma or self.min_snr_gamma


class ParamsError(ValueError):
    """Bad parameters: every problem, each naming the parameter and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Invalid parameters:\n" + "\n".join(f"  - {p}" for p in problems))


FIELDS = TrainingParams.model_fields
_ENUM_FIELDS = {name for name, f in FIELDS.items() if getattr(f.annotation, "__origin__", None) is Literal}


def _clean(name: str, value: Any) -> Any:
    """Undo what the Lab's form does to values: strings for everything, '' for unset."""
    annotation = FIELDS[name].annotation
    if isinstance(value, str):
        value = value.strip()
        if name in _ENUM_FIELDS:
            return value.lower()
        if annotation is int and re.fullmatch(r"[+-]?\d+\.0*", value):
            return value.split(".")[0]
    return value


def _is_unset(name: str, value: Any) -> bool:
    return value is None or (value == "" and FIELDS[name].annotation is not str)


def _describe(error: dict) -> str:
    name = ".".join(str(part) for part in error["loc"]) or "parameters"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{name}: required. {FIELDS[name].description}"
    message = message.replace("Input should be", "must be")
    return f"{name}: {message} (got {error['input']!r})"


def parse_params(raw: Mapping[str, Any],
                 also_accepted: Callable[[str], bool] = lambda key: False) -> tuple[TrainingParams, list[str]]:
    """Validate raw parameters (from JSON, flags or the Lab).

    Returns the parameters and the warnings to show (unknown keys, except those `also_accepted`
    says are expected: the Lab's bookkeeping). Raises ParamsError listing every problem at once.
    """
    known: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in raw.items():
        if key in FIELDS:
            if not _is_unset(key, value):
                known[key] = _clean(key, value)
        elif not also_accepted(key):
            close = difflib.get_close_matches(key, FIELDS.keys(), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            warnings.append(f"Unknown parameter '{key}' is ignored.{hint}")
    try:
        return TrainingParams.model_validate(known), warnings
    except ValidationError as exc:
        raise ParamsError([_describe(e) for e in exc.errors()]) from None
