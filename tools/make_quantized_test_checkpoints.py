"""Write tiny quantized Llama checkpoints with the real quantization tools.

The output (``tests/data/quantized/<name>/``) is committed as test data: every
checkpoint was written by the tool itself (GPTQModel, AutoAWQ, llm-compressor /
compressed-tensors), not by ember, and each directory carries a
``reference.json`` with greedy continuations computed by the tool's own
CPU inference (or, where the tool cannot run on CPU, by the tool's own
dequantization function; the ``note`` field says which).

This script is NOT part of ember's install. Run it in a separate venv that has
gptqmodel, autoawq, llmcompressor, compressed-tensors, transformers and
tokenizers::

    /tmp/qtools-venv/bin/python tools/make_quantized_test_checkpoints.py

Each tool runs in its own subprocess (the tools patch transformers on import),
so one failing tool does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data" / "quantized"

SEED = 0
VOCAB = 512
PROMPT_LENGTHS = (7, 12, 40)
NEW_TOKENS = 16
CALIB_SEQS = 8
CALIB_LEN = 64
MAX_DIR_BYTES = 1_500_000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

GPTQ_4 = "gptq-4bit-g32-act-order"
GPTQ_8 = "gptq-8bit-g64"
AWQ_4 = "awq-4bit-g32"
CT_FP8 = "ct-fp8-dynamic"
CT_W4A16 = "ct-w4a16"
CT_FP8_BLOCK = "ct-fp8-block"
CT_FP8_KV = "ct-fp8-kv"
CT_W4A16_ASYM = "ct-w4a16-asym-g32"
CT_GPTQ_ACTORDER = "ct-gptq-w4a16-actorder-weight-g32"
CHECKPOINTS = (
    GPTQ_4,
    GPTQ_8,
    AWQ_4,
    CT_FP8,
    CT_W4A16,
    CT_FP8_BLOCK,
    CT_FP8_KV,
    CT_W4A16_ASYM,
    CT_GPTQ_ACTORDER,
)
# llm-compressor's static per-tensor FP8 KV cache (calibrated: the k_scale / v_scale it writes)
KV_CACHE_SCHEME = {
    "num_bits": 8,
    "type": "float",
    "strategy": "tensor",
    "dynamic": False,
    "symmetric": True,
}


# --------------------------------------------------------------------------
# shared helpers (imported lazily so the tools are only loaded in subprocesses)
# --------------------------------------------------------------------------


def _torch():
    import torch

    torch.set_num_threads(2)
    return torch


def prompts() -> list[list[int]]:
    torch = _torch()
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def calibration_ids() -> list[list[int]]:
    """Data-free calibration: random token ids in [3, VOCAB)."""
    torch = _torch()
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (CALIB_LEN,), generator=g).tolist() for _ in range(CALIB_SEQS)]


def greedy(forward, dtype_name: str, note: str, extra: dict | None = None) -> dict:
    """Greedy decoding by full recompute (no KV cache, no generate() config).

    greedy_ids: the NEW_TOKENS new tokens only; prompt_last_logits: logits at the
    last prompt position; greedy_margins: top1 - top2 logit at every greedy step
    (small margins mark steps where another implementation may pick differently).
    """
    torch = _torch()
    ps = prompts()
    out = {
        "prompts": ps,
        "greedy_ids": [],
        "prompt_last_logits": [],
        "greedy_margins": [],
        "compute_dtype": dtype_name,
        "note": note,
    }
    with torch.no_grad():
        for p in ps:
            ids = list(p)
            margins = []
            for step in range(NEW_TOKENS):
                logits = forward(torch.tensor([ids], dtype=torch.long)).float()[0, -1]
                top = logits.topk(2)
                margins.append(float(top.values[0] - top.values[1]))
                if step == 0:
                    out["prompt_last_logits"].append([round(v, 5) for v in logits.tolist()])
                ids.append(int(top.indices[0]))
            out["greedy_ids"].append(ids[len(p) :])
            out["greedy_margins"].append([round(m, 5) for m in margins])
    if extra:
        out.update(extra)
    return out


def write_reference(out_dir: Path, ref: dict) -> None:
    (out_dir / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    print(f"[{out_dir.name}] greedy_ids={ref['greedy_ids']}")


def copy_tokenizer(dense: Path, out_dir: Path) -> None:
    for f in TOKENIZER_FILES:
        if not (out_dir / f).exists():
            shutil.copy(dense / f, out_dir / f)


# --------------------------------------------------------------------------
# steps (each runs in its own subprocess)
# --------------------------------------------------------------------------


def step_dense(work: Path, out: Path) -> None:
    _write_dense(work / "dense", hidden_size=128)


def _write_dense(dense: Path, hidden_size: int) -> None:
    """The random fp16 Llama the checkpoints quantize (`hidden_size` 256 for 128 x 128 FP8
    blocks: its k and v projections are then 128 rows, which a merged qkv needs)."""
    torch = _torch()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(dense)

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t3", pad_token="t0", bos_token="t1", eos_token="t2"
    )
    fast.save_pretrained(dense)


def _gptq_quantize(work: Path, out_dir: Path, **cfg) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # default pool wants >= 2 cpu workers
    torch = _torch()
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(device="cpu", offload_to_disk=False, **cfg)
    # device must come from QuantizeConfig.device; the dense model loads on CPU
    model = GPTQModel.load(str(work / "dense"), qcfg, dtype=torch.float16)
    calib = [
        {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        }
        for ids in calibration_ids()
    ]
    model.quantize(calib, batch_size=1)
    model.save(str(out_dir))


def _gptq_reference(work: Path, out_dir: Path) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    torch = _torch()
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    # the TORCH kernel only accepts float16/bfloat16
    model = GPTQModel.load(str(out_dir), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    qlinears = {n: m for n, m in model.model.named_modules() if isinstance(m, BaseQuantLinear)}
    kinds = sorted({type(m).__name__ for m in qlinears.values()})

    # second reference in float32: the same model with every quantized Linear replaced
    # by GPTQModel's own dequantize_weight() (fp16 values, computed in float32)
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(str(out_dir))
    del cfg.quantization_config
    dense = LlamaForCausalLM(cfg).to(torch.float32).eval()
    sd = {k: v.float() for k, v in model.model.state_dict().items() if k in dense.state_dict()}
    for n, m in qlinears.items():
        sd[n + ".weight"] = m.dequantize_weight().T.float()  # dequantize_weight gives [in, out]
    missing, unexpected = dense.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    fp32 = greedy(lambda x: dense(input_ids=x, use_cache=False).logits, "float32", "")

    ref = greedy(
        lambda x: model.model(input_ids=x, use_cache=False).logits,
        "float16",
        f"gptqmodel {gptqmodel.__version__}: GPTQModel.load(dir, backend=BACKEND.TORCH, "
        f"device='cpu', dtype=torch.float16) ({', '.join(kinds)}); greedy by full-recompute argmax",
        {
            "fp32_dequant_greedy_ids": fp32["greedy_ids"],
            "fp32_dequant_prompt_last_logits": fp32["prompt_last_logits"],
            "fp32_dequant_greedy_margins": fp32["greedy_margins"],
            "fp32_dequant_note": "transformers LlamaForCausalLM in float32 with each quantized "
            "Linear's weight = GPTQModel TorchLinear.dequantize_weight().T",
        },
    )
    write_reference(out_dir, ref)


def step_gptq_4bit(work: Path, out: Path) -> None:
    out_dir = out / GPTQ_4
    _gptq_quantize(work, out_dir, bits=4, group_size=32, desc_act=True, sym=False)
    copy_tokenizer(work / "dense", out_dir)


def step_gptq_8bit(work: Path, out: Path) -> None:
    out_dir = out / GPTQ_8
    _gptq_quantize(work, out_dir, bits=8, group_size=64, desc_act=False, sym=True)
    copy_tokenizer(work / "dense", out_dir)


def ref_gptq_4bit(work: Path, out: Path) -> None:
    _gptq_reference(work, out / GPTQ_4)


def ref_gptq_8bit(work: Path, out: Path) -> None:
    _gptq_reference(work, out / GPTQ_8)


def step_awq(work: Path, out: Path) -> None:
    torch = _torch()
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    out_dir = out / AWQ_4
    dense = work / "dense"
    model = AutoAWQForCausalLM.from_pretrained(str(dense), device_map="cpu", dtype=torch.float16)
    tok = AutoTokenizer.from_pretrained(str(dense))
    model.quantize(
        tok,
        quant_config={"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
        calib_data=calibration_ids(),  # list[list[int]]: used as-is, no dataset download
        max_calib_samples=CALIB_SEQS,
        max_calib_seq_len=CALIB_LEN,
    )
    model.save_quantized(str(out_dir))
    copy_tokenizer(dense, out_dir)


def ref_awq(work: Path, out: Path) -> None:
    """AutoAWQ cannot run inference on CPU here (see note); use its own dequant."""
    torch = _torch()
    import awq
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaForCausalLM

    out_dir = out / AWQ_4
    why = "AutoAWQ from_quantized"
    try:
        from awq import AutoAWQForCausalLM

        AutoAWQForCausalLM.from_quantized(str(out_dir), device_map="cpu", fuse_layers=False)
        why += " loaded on CPU unexpectedly; still using dequant path for determinism"
    except Exception as e:  # noqa: BLE001 - recorded in the note
        why += f" on CPU fails ({type(e).__name__}: {str(e).splitlines()[0][:120]})"

    cfg = AutoConfig.from_pretrained(str(out_dir))
    qcfg = cfg.quantization_config
    del cfg.quantization_config
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    sd = load_file(str(out_dir / "model.safetensors"))
    dense_sd = {}
    for k, v in sd.items():
        if k.endswith(".qweight"):
            p = k[: -len(".qweight")]
            w = dequantize_gemm(
                v, sd[p + ".qzeros"], sd[p + ".scales"], qcfg["bits"], qcfg["group_size"]
            )
            dense_sd[p + ".weight"] = w.T.float()  # dequantize_gemm gives [in, out] (fp16 math)
        elif not k.endswith((".qzeros", ".scales")):
            dense_sd[k] = v.float()
    missing, unexpected = model.load_state_dict(dense_sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)

    extra = {}
    try:  # independent cross-check: GPTQModel's AWQ torch kernel on the same files
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        import gptqmodel
        from gptqmodel import BACKEND, GPTQModel

        gm = GPTQModel.load(
            str(out_dir), backend=BACKEND.AWQ_TORCH, device="cpu", dtype=torch.float16
        )
        gref = greedy(lambda x: gm.model(input_ids=x, use_cache=False).logits, "float16", "")
        extra["cross_check_gptqmodel_awq_torch_fp16_greedy_ids"] = gref["greedy_ids"]
        extra["cross_check_note"] = (
            f"gptqmodel {gptqmodel.__version__} GPTQModel.load(dir, backend=BACKEND.AWQ_TORCH, "
            "device='cpu', dtype=float16)"
        )
    except Exception as e:  # noqa: BLE001
        extra["cross_check_note"] = f"GPTQModel AWQ_TORCH load failed: {type(e).__name__}: {e}"[
            :300
        ]

    ref = greedy(
        lambda x: model(input_ids=x, use_cache=False).logits,
        "float32",
        f"autoawq {awq.__version__}: {why}. Reference = transformers LlamaForCausalLM (float32) "
        "whose Linear weights are AutoAWQ's own awq.utils.packing_utils.dequantize_gemm(qweight, "
        "qzeros, scales, bits, group_size).T (fp16 dequant, like WQLinear_GEMM's CPU fallback)",
        extra,
    )
    write_reference(out_dir, ref)


def oneshot_calibrated(model, recipe) -> None:
    """llm-compressor's `oneshot` of `recipe` on `model`, calibrated on `calibration_ids()`."""
    from datasets import Dataset
    from llmcompressor import oneshot

    ids = calibration_ids()
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})
    oneshot(
        model=model,
        recipe=recipe,
        dataset=dataset,
        num_calibration_samples=len(ids),
        max_seq_length=CALIB_LEN,
    )


def _ct_quantize(
    work: Path,
    out_dir: Path,
    scheme: str | dict,
    kv_cache_scheme: dict | None = None,
    dense="dense",
) -> None:
    """`scheme`: a preset's name, or the weights' QuantizationArgs as a dict."""
    torch = _torch()
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(work / dense), dtype=torch.float16)
    if isinstance(scheme, dict):
        recipe = QuantizationModifier(
            config_groups={"group_0": {"targets": ["Linear"], "weights": scheme}},
            ignore=["lm_head"],
        )
    else:
        recipe = QuantizationModifier(
            targets="Linear", scheme=scheme, ignore=["lm_head"], kv_cache_scheme=kv_cache_scheme
        )
    if kv_cache_scheme is None:
        oneshot(model=model, recipe=recipe)  # data-free (DataFreePipeline) for these schemes
    else:  # the KV scales are calibrated: the keys and values of the calibration sequences
        oneshot_calibrated(model, recipe)
    model.save_pretrained(str(out_dir), save_compressed=True)
    copy_tokenizer(work / dense, out_dir)


def _ct_reference(out_dir: Path) -> None:
    torch = _torch()
    import compressed_tensors
    import transformers
    from compressed_tensors.quantization.lifecycle.helpers import disable_quantization
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()

    def fwd(x):
        return model(input_ids=x, use_cache=False).logits

    ref = greedy(
        fwd,
        "float32",
        f"transformers {transformers.__version__} + compressed-tensors {compressed_tensors.__version__}: "
        "AutoModelForCausalLM.from_pretrained(dir, dtype=float32) on CPU (decompresses weights; "
        "input-activation quantization, if the scheme has one, is fake-quantized by compressed-tensors)",
    )
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.float32, q.weight.dtype
    scheme = q.quantization_scheme
    if scheme.input_activations is not None:
        model.apply(disable_quantization)
        add_run(
            ref,
            "weight_only",
            greedy(fwd, "float32", ""),
            "same decompressed weights, compressed_tensors disable_quantization() applied: "
            "no activation quantization (what a weight-only dequant loader computes)",
        )
    write_reference(out_dir, ref)


def add_run(ref: dict, name: str, run: dict, note: str) -> None:
    """A second run of the same checkpoint in `ref`, its fields prefixed by `name`."""
    for field in ("greedy_ids", "prompt_last_logits", "greedy_margins"):
        ref[f"{name}_{field}"] = run[field]
    ref[f"{name}_note"] = note


def step_ct_fp8(work: Path, out: Path) -> None:
    _ct_quantize(work, out / CT_FP8, "FP8_DYNAMIC")


def step_ct_w4a16(work: Path, out: Path) -> None:
    _ct_quantize(work, out / CT_W4A16, "W4A16")


def step_ct_fp8_block(work: Path, out: Path) -> None:
    _write_dense(work / "dense-256", hidden_size=256)
    _ct_quantize(work, out / CT_FP8_BLOCK, "FP8_BLOCK", dense="dense-256")


def step_ct_fp8_kv(work: Path, out: Path) -> None:
    _ct_quantize(work, out / CT_FP8_KV, "FP8_DYNAMIC", kv_cache_scheme=KV_CACHE_SCHEME)


def step_ct_w4a16_asym(work: Path, out: Path) -> None:
    """W4A16_ASYM's weights in groups of 32 (its preset's 128 would make a group of the whole
    128-wide input, which tensor parallelism cannot split)."""
    weights = {"num_bits": 4, "type": "int", "symmetric": False}
    weights |= {"strategy": "group", "group_size": 32}
    _ct_quantize(work, out / CT_W4A16_ASYM, weights)


def step_ct_gptq_actorder(work: Path, out: Path) -> None:
    """llm-compressor's GPTQModifier with actorder="weight" (its only act-order since 0.14 removed
    "group"): W4A16 in groups of 32, the columns quantized in activation order and stored in
    their own, calibrated on the sequences below."""
    torch = _torch()
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(work / "dense"), dtype=torch.float16)
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    weights |= {"group_size": 32, "actorder": "weight"}
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
    )
    oneshot_calibrated(model, recipe)
    out_dir = out / CT_GPTQ_ACTORDER
    model.save_pretrained(str(out_dir), save_compressed=True)
    copy_tokenizer(work / "dense", out_dir)


def ref_ct_gptq_actorder(work: Path, out: Path) -> None:
    _ct_reference(out / CT_GPTQ_ACTORDER)


def ref_ct_w4a16_asym(work: Path, out: Path) -> None:
    _ct_reference(out / CT_W4A16_ASYM)


def ref_ct_fp8_block(work: Path, out: Path) -> None:
    _ct_reference(out / CT_FP8_BLOCK)


def ref_ct_fp8_kv(work: Path, out: Path) -> None:
    """The tool's run (compressed-tensors rounds keys and values through e4m3 on the
    checkpoint's k_scale / v_scale in an attention pre-hook), and the same run with that hook
    removed: the model without the FP8 KV cache."""
    _ct_reference(out / CT_FP8_KV)
    torch = _torch()
    from transformers import AutoModelForCausalLM

    out_dir = out / CT_FP8_KV
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if "kv_cache" in getattr(hook, "__name__", ""):
                del module._forward_pre_hooks[key]
                removed += 1
    assert removed == len(model.model.layers), removed
    reference = json.loads((out_dir / "reference.json").read_text())
    add_run(
        reference,
        "kv_off",
        greedy(lambda x: model(input_ids=x, use_cache=False).logits, "float32", ""),
        "the run above with compressed-tensors' KV-cache attention hook removed from every "
        "layer: keys and values not rounded to e4m3",
    )
    write_reference(out_dir, reference)


def ref_ct_fp8(work: Path, out: Path) -> None:
    _ct_reference(out / CT_FP8)


def ref_ct_w4a16(work: Path, out: Path) -> None:
    _ct_reference(out / CT_W4A16)


STEPS = {
    "dense": step_dense,
    f"quantize:{GPTQ_4}": step_gptq_4bit,
    f"reference:{GPTQ_4}": ref_gptq_4bit,
    f"quantize:{GPTQ_8}": step_gptq_8bit,
    f"reference:{GPTQ_8}": ref_gptq_8bit,
    f"quantize:{AWQ_4}": step_awq,
    f"reference:{AWQ_4}": ref_awq,
    f"quantize:{CT_FP8}": step_ct_fp8,
    f"reference:{CT_FP8}": ref_ct_fp8,
    f"quantize:{CT_W4A16}": step_ct_w4a16,
    f"reference:{CT_W4A16}": ref_ct_w4a16,
    f"quantize:{CT_FP8_BLOCK}": step_ct_fp8_block,
    f"reference:{CT_FP8_BLOCK}": ref_ct_fp8_block,
    f"quantize:{CT_FP8_KV}": step_ct_fp8_kv,
    f"reference:{CT_FP8_KV}": ref_ct_fp8_kv,
    f"quantize:{CT_W4A16_ASYM}": step_ct_w4a16_asym,
    f"reference:{CT_W4A16_ASYM}": ref_ct_w4a16_asym,
    f"quantize:{CT_GPTQ_ACTORDER}": step_ct_gptq_actorder,
    f"reference:{CT_GPTQ_ACTORDER}": ref_ct_gptq_actorder,
}


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def run_step(name: str, work: Path, out: Path, log_dir: Path) -> bool:
    log = log_dir / (name.replace(":", "_") + ".log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_step", name]
    cmd += ["--_work", str(work), "--out", str(out.resolve())]
    with open(log, "w") as f:
        # cwd=work: GPTQModel writes logs/gptq_log_*.log into the current directory
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=work)
    status = "ok" if rc == 0 else f"FAILED (rc={rc}, log {log})"
    print(f"{name}: {status}", flush=True)
    if rc != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-15:]))
    return rc == 0


def dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(CHECKPOINTS)}")
    ap.add_argument("--_step", help=argparse.SUPPRESS)
    ap.add_argument("--_work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._step:
        STEPS[args._step](args._work, args.out)  # a traceback exits non-zero
        return 0

    names = [n for n in args.only.split(",") if n] or list(CHECKPOINTS)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="qckpt-") as tmp:
        work = Path(tmp)
        log_dir = work / "logs"
        log_dir.mkdir()
        if not run_step("dense", work, args.out, log_dir):
            return 1
        for name in names:
            shutil.rmtree(args.out / name, ignore_errors=True)
            if not (
                run_step(f"quantize:{name}", work, args.out, log_dir)
                and run_step(f"reference:{name}", work, args.out, log_dir)
            ):
                failed.append(name)
                continue
            size = dir_size(args.out / name)
            print(f"  {name}: {size} bytes: {sorted(p.name for p in (args.out / name).iterdir())}")
            if size > MAX_DIR_BYTES:
                print(f"  WARNING: {name} is larger than {MAX_DIR_BYTES} bytes")
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
