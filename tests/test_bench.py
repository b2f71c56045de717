"""The training-step benchmark: its FLOP counter (hand count and PyTorch's FlopCounterMode), peaks, synthetic teacher
and shards, the fast/naive mode switch on a real trainer, and one short run of `python -m pretrain.bench` in both
modes. No timing assertions (performance is measured by the benchmark command itself, docs/performance.md)."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain import bench, flops
from tests.helpers import REPO, saved_signal_handlers, torch_threads

SMALL = REPO / "configs" / "bench-cpu-small.json"
TINY_TEACHER = (
    "teacher.name_or_path=random:bert,hidden_size=32,num_hidden_layers=4,num_attention_heads=4,"
    "intermediate_size=64,vocab_size=300,max_position_embeddings=64"
)
TINY = [TINY_TEACHER, "deepspeed.train_micro_batch_size_per_gpu=2"]
DOCUMENTED_KEYS = {
    "mode",
    "device",
    "device_name",
    "precision",
    "steps",
    "step_s",
    "cpu_s",
    "data_wait_s",
    "tokens_per_step",
    "sequences_per_step",
    "tokens_per_s",
    "sequences_per_s",
    "flops_per_token",
    "flops_per_step",
    "achieved_flops_per_s",
    "peak_flops_per_s",
    "peak_source",
    "mfu",
    "peak_memory_mib",
    "memory_kind",
    "mode_detail",
    "config",
}


def tiny_distill(naive: bool, *, hidden=16, layers=4, inter=40, vocab=97, heads=2, seed=0):
    """A random BERT teacher (eager attention) -> 2-layer student in a DistillationModel (DistilBERT losses)."""
    from transformers import BertConfig, BertForMaskedLM

    from pretrain.distill import DistillationModel
    from pretrain.losses import LossConfig
    from pretrain.student import StudentConfig, build_student

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    teacher = BertForMaskedLM(cfg).eval()
    student, record = build_student(teacher, StudentConfig(layers="every_other"))
    student.set_attn_implementation("eager")
    return DistillationModel(student, teacher, LossConfig(), record["layer_map"], naive=naive)


def test_encoder_and_head_flops_match_a_hand_count():
    from transformers import BertConfig

    h, n, i, v, b, seq = 8, 2, 16, 50, 2, 4
    cfg = BertConfig(hidden_size=h, num_hidden_layers=n, intermediate_size=i, vocab_size=v, num_attention_heads=2)
    per_layer = sum([2 * h * h] * 4)  # Q, K, V, output projections: 4 x 2 H^2 per position
    per_layer += 2 * h * i + 2 * i * h  # feed-forward up and down
    per_layer += 2 * seq * h + 2 * seq * h  # Q K^T and A V: every query with every key
    assert flops.encoder_flops(cfg, b, seq) == n * b * seq * per_layer == 18432
    assert flops.head_flops(cfg, 3) == 3 * (2 * h * h + 2 * h * v) == 2784


@pytest.mark.parametrize("naive", [False, True], ids=["gathered", "naive"])
def test_step_flops_equal_pytorchs_count_of_a_real_step(naive):
    """Teacher forward + student forward and backward of a tiny DistillationModel, counted by
    torch.utils.flop_counter (every matmul / bmm PyTorch ran, backward included) == step_flops."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.masking import Masker, MaskingConfig

    model = tiny_distill(naive).train()
    b, seq = 3, 12
    ids = torch.randint(5, 97, (b, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    masker = Masker(MaskingConfig(), vocab_size=97, special_ids=[0, 1, 2, 3, 4], mask_token_id=4, pad_token_id=0)
    x, labels = masker(ids, mask, step=0, rank=0, micro_step=0)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(x, mask, labels)
        loss.backward()
    rows = b * seq if naive else int((labels != -100).sum())
    expected = flops.step_flops(model, sequences=b, seq_len=seq, head_positions=rows)
    assert 0 < rows < b * seq or naive
    assert counter.get_total_flops() == expected["total"]
    assert expected["student_backward"] == 2 * expected["student_forward"]


def test_step_flops_count_projections_and_relations():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertForMaskedLM

    from pretrain.distill import DistillationModel
    from pretrain.losses import LossConfig
    from pretrain.student import StudentConfig, build_student

    torch.manual_seed(0)
    teacher = BertForMaskedLM(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            attn_implementation="eager",
        )
    ).eval()
    student, record = build_student(
        teacher, StudentConfig(layers=[0, 1], init="random", hidden_size=8, num_attention_heads=2, intermediate_size=16)
    )
    student.set_attn_implementation("eager")
    loss_cfg = LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=1.0, alpha_att=1.0, alpha_val=1.0, relation_heads=2)
    model = DistillationModel(student, teacher, loss_cfg, record["layer_map"]).train()
    assert model.projections is not None and model.relation_pairs
    ids = torch.randint(5, 50, (2, 6))
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(ids, torch.ones_like(ids), torch.full_like(ids, -100))
        loss.backward()
    assert counter.get_total_flops() == flops.step_flops(model, sequences=2, seq_len=6, head_positions=0)["total"]


def test_datasheet_peaks_by_device_name():
    assert flops.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4e12
    assert flops.datasheet_peak("NVIDIA H100 80GB HBM3", "fp16")[0] == 989.4e12
    assert flops.datasheet_peak("NVIDIA H100 PCIe", "bf16")[0] == 756.5e12
    assert flops.datasheet_peak("NVIDIA A100-SXM4-80GB", "fp16")[0] == 312e12
    assert flops.datasheet_peak("NVIDIA H200", "fp16")[0] == 989.4e12
    peak, why = flops.datasheet_peak("NVIDIA GeForce GTX 1080", "fp16")
    assert peak is None and "--peak-tflops" in why
    assert flops.measure_cpu_peak(128, repeats=1) > 0


@pytest.mark.parametrize("model_type,pad,mask", [("bert", 0, 103), ("roberta", 1, 299)])
def test_random_teacher_and_synthetic_shards(tmp_path, model_type, pad, mask):
    from transformers import AutoConfig, AutoTokenizer

    from data_prep.shards import ShardedTokens, load_token_counts

    spec = (
        f"random:{model_type},hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,"
        f"vocab_size=300"
    )
    assert bench.parse_random_spec(spec) == (
        model_type,
        {
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "vocab_size": 300,
        },
    )
    folder = bench.make_random_teacher(spec, tmp_path / "teacher")
    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert config.model_type == model_type and config.architectures[0].endswith("ForMaskedLM")
    assert len(tok) == config.vocab_size == 300 and (tok.pad_token_id, tok.mask_token_id) == (pad, mask)
    shards = bench.write_synthetic_shards(tmp_path / "shards", tok, seq_len=24, num_sequences=40, valid_sequences=4)
    ds = ShardedTokens(shards, "train")
    assert len(ds) >= 40 and len(ShardedTokens(shards, "valid")) >= 4
    special = set(tok.all_special_ids)
    for i in range(len(ds) - 1):  # the last sequence of a split may be shorter
        seq = ds[i]
        assert len(seq) == 24 and seq[0] == tok.cls_token_id and seq[-1] == tok.sep_token_id
        assert set(seq[1:-1].tolist()) & special <= {tok.sep_token_id}  # document separators only
    counts = load_token_counts(shards)
    assert counts.sum() == sum(len(ds[i]) for i in range(len(ds))) and len(counts) == 300
    assert ds.manifest["tokenizer"]["vocab_size"] == 300 and ds.manifest["max_seq_length"] == 24


def test_mode_switch_gives_the_same_loss_and_restores_the_fast_step(tmp_path):
    """On a real trainer: naive (full logits, eager attention) and fast compute the same losses on the same batch
    (dropout off), and switching back restores the configured step."""
    import argparse

    from pretrain.trainer import Trainer

    args = argparse.Namespace(
        config=str(SMALL),
        overrides=TINY,
        synthetic=False,
        seq_len=16,
        warmup=0,
        steps=1,
        naive=False,
        both=True,
        ablate=[],
    )
    with torch_threads(1), saved_signal_handlers():
        cfg = bench.prepare_run(args, tmp_path)
        trainer = Trainer(cfg)
        try:
            trainer.setup()
            modes = [
                bench.FAST,
                bench.NAIVE,
                bench.ABLATION_MODES["optimizer"],
                bench.ABLATION_MODES["malloc"],
                bench.ABLATION_MODES["dropout"],
            ]
            switch = bench.ModeSwitch(trainer, modes)
            batch = next(trainer.loader)
            x, labels = trainer.recipe.masker(batch["input_ids"], batch["attention_mask"], step=0, rank=0, micro_step=0)
            trainer.engine.eval()
            results = {}
            for mode in (bench.FAST, bench.NAIVE):
                switch.set(mode)
                with torch.no_grad():
                    results[mode.name] = trainer.engine(x, batch["attention_mask"], labels)[1]
                assert trainer.model.naive == (mode is bench.NAIVE)
                assert trainer.model.student.config._attn_implementation == ("eager" if mode is bench.NAIVE else "sdpa")
            for k in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
                torch.testing.assert_close(results["fast"][k], results["naive"][k], rtol=1e-5, atol=1e-6)
            switch.set(bench.ABLATION_MODES["optimizer"])
            assert trainer.engine.optimizer.param_groups[0]["fused"] is False
            dropouts = [m for m in trainer.model.student.modules() if isinstance(m, torch.nn.Dropout)]
            p_fast = trainer.model.student.config.hidden_dropout_prob
            assert dropouts and p_fast > 0 and {m.p for m in dropouts} == {p_fast}  # attention dropout too
            switch.set(bench.ABLATION_MODES["dropout"])
            assert {m.p for m in dropouts} == {0.0}
            trainer.engine.train()
            with torch.no_grad():  # dropout off in training mode: the eval-mode losses of the fast step
                off = trainer.engine(x, batch["attention_mask"], labels)[1]
            torch.testing.assert_close(off["loss"], results["fast"]["loss"], rtol=1e-5, atol=1e-6)
            switch.set(bench.FAST)
            assert {m.p for m in dropouts} == {p_fast}
            assert trainer.engine.optimizer.param_groups[0]["fused"] is True  # the trainer's default on CPU
            assert trainer.engine.enable_backward_allreduce is False  # one rank, ZeRO-0
            assert trainer.model.teacher.config._attn_implementation == "sdpa" and not trainer.model.naive
        finally:
            trainer.close()


def test_bench_runs_both_modes_and_prints_the_documented_keys(tmp_path, capsys):
    with torch_threads(1), saved_signal_handlers():
        rc = bench.main(
            [
                "--config",
                str(SMALL),
                *TINY,
                "--seq-len",
                "16",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--both",
                "--ablate",
                "head",
                "--peak-size",
                "256",
            ]
        )
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    recs = {r["mode"]: r for r in lines}
    assert list(recs) == ["fast", "naive", "fast-full-logits", "comparison"]
    for name in ("fast", "naive", "fast-full-logits"):
        r = recs[name]
        assert set(r) >= DOCUMENTED_KEYS, DOCUMENTED_KEYS - set(r)
        assert r["device"] == "cpu" and r["precision"] == "fp32" and r["steps"] == 1
        assert r["sequences_per_step"] == 2 and r["tokens_per_step"] == 32  # full synthetic sequences
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_memory_mib"] > 0
        assert r["config"]["teacher"]["hidden"] == 32 and r["config"]["student"]["layers"] == 2
        assert r["config"]["seq_len"] == 16 and r["config"]["micro_batch"] == 2
    assert recs["naive"]["mode_detail"]["full_logits"] and recs["naive"]["mode_detail"]["eager"]
    # the naive step and the full-logit ablation run the heads on all 32 positions: 4 layers of teacher forward,
    # 2 of student forward + backward, and the heads (transform + decoder) on every position
    per_pos = 32 * 32 * 8 + 4 * 32 * 64 + 4 * 16 * 32
    full = 4 * 32 * per_pos + 3 * 2 * 32 * per_pos + 4 * 32 * (2 * 32 * 32 + 2 * 32 * 300)
    assert recs["naive"]["flops_per_step"] == recs["fast-full-logits"]["flops_per_step"] == full
    assert recs["fast"]["flops_per_step"] < full
    assert recs["comparison"]["speedup"] == pytest.approx(
        recs["fast"]["tokens_per_s"] / recs["naive"]["tokens_per_s"], rel=1e-2
    )


def test_bad_random_spec_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="hidden_size"):
        bench.main(["--config", str(SMALL), "teacher.name_or_path=random:bert,hidden_size", "--steps", "1"])


# a tiny random teacher of each GPU family config's family (python -m pretrain.bench's ``random:`` spec)
FAMILY_TEACHERS = {
    "modernbert.json": "random:modernbert,hidden_size=32,num_hidden_layers=6,num_attention_heads=4,"
    "intermediate_size=64,vocab_size=300,max_position_embeddings=64,global_attn_every_n_layers=3,local_attention=16",
    "deberta-v3.json": "random:deberta-v2,hidden_size=32,num_hidden_layers=4,num_attention_heads=4,"
    "intermediate_size=64,vocab_size=300,max_position_embeddings=64,relative_attention=true,position_buckets=16",
    "xlmr.json": "random:xlm-roberta,hidden_size=32,num_hidden_layers=4,num_attention_heads=4,intermediate_size=64,"
    "vocab_size=300,max_position_embeddings=66",
}


@pytest.mark.parametrize("name", sorted(FAMILY_TEACHERS))
def test_bench_runs_each_family_config_on_cpu(name, capsys):
    """The CPU smoke of scripts/bench_gpu.sh for each family's GPU config (``BENCH_CONFIG=configs/NAME``): its
    ``python -m pretrain.bench --config`` step, with a tiny random teacher of the family, fp32, synthetic shards
    (their word-level vocabulary has no word-start marks, so XLM-R's whole-word masking is off here)."""
    extra = [] if name == "modernbert.json" else ["student.layers=every_other"]  # ModernBERT keeps its cadence map
    if name == "xlmr.json":
        extra.append("masking.whole_word_mask=false")
    with torch_threads(1), saved_signal_handlers():
        rc = bench.main(
            [
                "--config",
                str(REPO / "configs" / name),
                f"teacher.name_or_path={FAMILY_TEACHERS[name]}",
                "deepspeed.bf16.enabled=false",
                "deepspeed.fp16.enabled=false",
                "deepspeed.train_micro_batch_size_per_gpu=2",
                "deepspeed.train_batch_size=2",
                *extra,
                "--synthetic",
                "--seq-len",
                "16",
                "--steps",
                "1",
                "--warmup",
                "0",
            ]
        )
    assert rc == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    fast = next(r for r in recs if r["mode"] == "fast")
    assert fast["steps"] == 1 and fast["tokens_per_step"] == 32 and fast["tokens_per_s"] > 0 and fast["mfu"] > 0
    assert fast["config"]["teacher"]["hidden"] == 32
    assert fast["config"]["student"]["layers"] == (3 if name == "modernbert.json" else 2)  # cadence: half of 6
