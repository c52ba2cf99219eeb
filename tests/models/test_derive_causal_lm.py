"""Causal-LM students derived from the teacher (prune, then distil): tiny Llama-style and GPT-2
decoders built here, with a byte-level BPE tokenizer trained on Tiny Shakespeare."""

import copy
import json
import math

import pytest
import torch
from conftest import bpe_tokenizer, tiny_lm_recipe

import distill
from distill.config import DeriveSpec, parse_recipe
from distill.errors import ModelError, RecipeError
from distill.models.derive import count_parameters
from distill.models.load import load_hf
from distill.models.student import derive_student

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak.",
         "MENENIUS:\nWhat work's, my countrymen, in hand? where go you"]


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:100_000]
    return bpe_tokenizer(text)


def _config(family, tokenizer, layers=4):
    common = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.eos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if family == "gpt2":
        return transformers.GPT2Config(n_positions=128, n_embd=32, n_layer=layers, n_head=4, **common)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    return cls(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, head_dim=8, max_position_embeddings=128, **common)


def _save_teacher(folder, family, tokenizer, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, tokenizer))
    with torch.no_grad():  # random but not tiny norms and biases, so that copying them matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name or "ln_" in name else 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _teacher(tmp_path, family, tokenizer):
    adapter = load_hf("hf-causal-lm", str(_save_teacher(tmp_path / family, family, tokenizer)), max_length=64)
    adapter.module.eval()
    return adapter


def _ids(tokenizer):
    return torch.tensor([tokenizer(TEXTS[0])["input_ids"][:20]])


@torch.no_grad()
def test_kept_layers_compute_the_teachers_embeddings_layers_norm_and_head(tmp_path, tokenizer):
    teacher = _teacher(tmp_path, "llama", tokenizer)
    student = derive_student(teacher, DeriveSpec(layers=[0, 2]), [])
    student.module.eval()
    assert student.module.config.num_hidden_layers == 2 and len(student.module.model.layers) == 2
    ids = _ids(tokenizer)
    # The teacher by hand: embeddings, decoder layers 0 and 2 under a causal mask, final norm, head.
    t = teacher.module.model
    h = t.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rope = t.rotary_emb(h, positions)
    n = ids.shape[1]
    mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
    for i in (0, 2):
        out = t.layers[i](h, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        h = out[0] if isinstance(out, tuple) else out
    expected = teacher.module.lm_head(t.norm(h))
    torch.testing.assert_close(student.module(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # And not what the whole teacher computes.
    assert not torch.allclose(teacher.module(ids).logits, expected, atol=1e-3)


def _without_layers(model, keep):
    """The teacher with only the ``keep`` layers left in its layer list (the reference)."""
    ref = copy.deepcopy(model)
    body = ref.base_model
    blocks = body.layers if hasattr(body, "layers") else body.h
    kept = torch.nn.ModuleList(blocks[i] for i in keep)
    if hasattr(body, "layers"):
        body.layers = kept
    else:
        body.h = kept
    ref.config.num_hidden_layers = len(keep)
    if getattr(ref.config, "layer_types", None) is not None:
        ref.config.layer_types = [ref.config.layer_types[i] for i in keep]
    return ref


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gpt2"])
@torch.no_grad()
def test_other_families_keep_layers_exactly(tmp_path, tokenizer, family):
    teacher = _teacher(tmp_path, family, tokenizer)
    student = derive_student(teacher, DeriveSpec(layers=[3, 1]), [])
    student.module.eval()
    ids = _ids(tokenizer)
    reference = _without_layers(teacher.module, [3, 1])
    torch.testing.assert_close(student.module(ids, use_cache=False).logits,
                               reference(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def _head_groups(student_k, teacher_k, head_dim):
    """Which teacher key/value heads the student's k_proj rows are, in order."""
    groups = []
    for chunk in student_k.split(head_dim):
        found = [g for g, t in enumerate(teacher_k.split(head_dim)) if torch.equal(chunk, t)]
        assert len(found) == 1
        groups.append(found[0])
    return groups


@torch.no_grad()
def test_pruned_heads_and_neurons_equal_silencing_them_in_the_teacher(tmp_path, tokenizer):
    teacher = _teacher(tmp_path, "llama", tokenizer)
    t_layers = teacher.module.model.layers
    # Make key/value group 1 of layer 0 and neurons 40..47 of layer 1 the loudest: they must be kept.
    t_layers[0].self_attn.v_proj.weight[8:16] *= 20
    t_layers[1].mlp.up_proj.weight[40:] *= 20
    spec = DeriveSpec(num_attention_heads=2, intermediate_size=24)
    student = derive_student(teacher, spec, [{"text": TEXTS}])
    student.module.eval()
    config = student.module.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert config.intermediate_size == 24 and config.hidden_size == 32

    reference = copy.deepcopy(teacher.module)
    for t_layer, s_layer, r_layer in zip(t_layers, student.module.model.layers, reference.model.layers, strict=True):
        (group,) = _head_groups(s_layer.self_attn.k_proj.weight, t_layer.self_attn.k_proj.weight, 8)
        # Whole groups: the query heads that read key/value head g are 2g and 2g + 1.
        torch.testing.assert_close(s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight[16 * group:][:16])
        silenced_heads = torch.ones(32, dtype=torch.bool)
        silenced_heads[16 * group : 16 * group + 16] = False
        r_layer.self_attn.o_proj.weight[:, silenced_heads] = 0
        kept = [(t_layer.mlp.up_proj.weight == row).all(-1).nonzero().item() for row in s_layer.mlp.up_proj.weight]
        silenced = torch.ones(48, dtype=torch.bool)
        silenced[kept] = False
        r_layer.mlp.down_proj.weight[:, silenced] = 0
        if t_layer is t_layers[0]:
            assert group == 1
        if t_layer is t_layers[1]:
            assert set(range(40, 48)) <= set(kept)
    ids = _ids(tokenizer)
    torch.testing.assert_close(student.module(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_narrower_hidden_state_saves_and_reloads_as_plain_transformers(tmp_path, tokenizer):
    teacher = _teacher(tmp_path, "llama", tokenizer)
    spec = DeriveSpec(layers=[0, 3], hidden_size=24, num_attention_heads=2, intermediate_size=16)
    student = derive_student(teacher, spec, [{"text": TEXTS}])
    student.module.eval()
    config = student.module.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (24, 2, 2)
    assert count_parameters(student.module) < count_parameters(teacher.module) / 2
    # Every kept embedding column is one of the teacher's columns, in the teacher's order.
    t_emb, s_emb = teacher.module.model.embed_tokens.weight, student.module.model.embed_tokens.weight
    columns = [next(j for j in range(32) if torch.equal(c, t_emb[:, j])) for c in s_emb.T]
    assert columns == sorted(columns) and len(set(columns)) == 24
    student.save(tmp_path / "student")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["hidden_size"] == 24 and saved["head_dim"] == 8
    ids = _ids(tokenizer)
    logits = reloaded(ids).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, student.module(ids).logits)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "student")
    assert tok(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]


@torch.no_grad()
def test_narrower_gpt2(tmp_path, tokenizer):
    teacher = _teacher(tmp_path, "gpt2", tokenizer)
    student = derive_student(teacher, DeriveSpec(layers=[1, 2], hidden_size=16, intermediate_size=40),
                             [{"text": TEXTS}])
    config = student.module.config
    assert (config.n_embd, config.n_head, config.n_inner, config.n_layer) == (16, 2, 40, 2)
    student.save(tmp_path / "student")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    student.module.eval()
    ids = _ids(tokenizer)
    torch.testing.assert_close(reloaded(ids).logits, student.module(ids).logits)


@pytest.mark.parametrize("spec, match", [
    (DeriveSpec(layers=[0, 9]), "indices in 0..3"),
    (DeriveSpec(num_attention_heads=3), "multiple of 2"),
    (DeriveSpec(hidden_size=64), "1..32"),
])
def test_bad_specs(tmp_path, tokenizer, spec, match):
    teacher = _teacher(tmp_path, "llama", tokenizer)
    with pytest.raises(RecipeError, match=match):
        derive_student(teacher, spec, [{"text": TEXTS}])


def test_gpt2_attention_must_match_its_width(tmp_path, tokenizer):
    teacher = _teacher(tmp_path, "gpt2", tokenizer)
    with pytest.raises(RecipeError, match="hidden_size 16 must equal num_attention_heads 4"):
        derive_student(teacher, DeriveSpec(hidden_size=16, num_attention_heads=4), [{"text": TEXTS}])


def test_unsupported_architecture_is_named(tmp_path, tokenizer):
    config = transformers.OPTConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16,
                                    max_position_embeddings=64)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    teacher = load_hf("hf-causal-lm", str(tmp_path / "opt"))
    with pytest.raises(ModelError, match="not 'opt' \\(OPTForCausalLM\\)"):
        derive_student(teacher, DeriveSpec(layers=[0]), [])


def lm_recipe(tmp_path, data_dir, teacher_dir, **changes):
    return tiny_lm_recipe(tmp_path, data_dir, teacher_dir, name="tiny-derived-lm",
                          losses=[{"name": "token_kd", "params": {"kind": "forward_kl"}}], **changes)


def test_recipe_checks_causal_lm_derivation(tmp_path, data_dir):
    recipe = parse_recipe(lm_recipe(tmp_path, data_dir, tmp_path))
    assert recipe.student.derive.layers == [0, 2]
    with pytest.raises(RecipeError, match="student.derive.vocab: a causal-LM student keeps the teacher's vocabulary"):
        parse_recipe(lm_recipe(tmp_path, data_dir, tmp_path, student={"derive": {"vocab": "data"}}))


def test_derived_student_trains_end_to_end(tmp_path, data_dir, tokenizer):
    teacher_dir = _save_teacher(tmp_path / "teacher", "llama", tokenizer)
    result = distill.run(lm_recipe(tmp_path, data_dir, teacher_dir))
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "train/student/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6 and {"token_kd_loss", "task_loss"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]
    models = result.models
    assert all(math.isfinite(models[r]["perplexity"]) for r in ("teacher", "student", "baseline"))
    for role in ("student", "baseline"):
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(run / role)
        assert isinstance(reloaded, transformers.LlamaForCausalLM)
        assert reloaded.config.num_hidden_layers == 2
        assert count_parameters(reloaded) == models[role]["parameters"] < models["teacher"]["parameters"]
