"""The model layer on the tiny random GPT-2 and T5: loading, LoRA, value head, reference, padding."""

from __future__ import annotations

import pytest
import torch

from alignloop import models
from alignloop.errors import UserError
from alignloop.models import LoraSettings, load_lm, load_policy, parameter_storage_bytes

PROMPTS = ["the dog is", "what do you want to do with my house ?", "a", "why is the cat not good"]
RESPONSES = ["good .", "open the window please", "cat is a great dog", "no"]


@pytest.fixture(params=["gpt2", "t5"])
def tiny(request, tiny_gpt2, tiny_t5):
    return tiny_gpt2 if request.param == "gpt2" else tiny_t5


def _perturb_lora(model, seed: int = 1) -> None:
    """LoRA's B starts at zero (adapter = identity); give it weights so policy != base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _batch(policy):
    p, r = models.encode_pairs(policy.tokenizer, PROMPTS, RESPONSES, policy.is_seq2seq)
    return policy.batch(p, r)


def test_load_by_folder(tiny_gpt2, tiny_t5):
    m, tok = load_lm(tiny_gpt2)
    assert type(m).__name__ == "GPT2LMHeadModel" and not models.is_seq2seq(tiny_gpt2)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert m.dtype == torch.float32 and not m.training
    m, tok = load_lm(str(tiny_t5))
    assert type(m).__name__ == "T5ForConditionalGeneration" and models.is_seq2seq(tiny_t5)
    assert tok.padding_side == "right"


def test_bad_model_id_is_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load model"):
        load_lm(tmp_path / "nope")


def test_device_and_dtype_defaults():
    assert models.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.default_dtype("cpu") == torch.float32  # never bf16 on CPU
    assert models.configure_threads() == torch.get_num_threads() >= 1


def test_lora_wrap_trains_only_adapter(tiny_gpt2, tiny_t5):
    for path, expected in (
        (tiny_gpt2, {"c_attn", "c_proj", "c_fc"}),
        (tiny_t5, {"q", "k", "v", "o", "wi", "wo"}),
    ):
        policy = load_policy(path, lora=LoraSettings(r=4, alpha=8))
        assert set(policy.model.peft_config["default"].target_modules) == expected
        names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)
        custom = load_policy(
            path, lora=LoraSettings(r=2, target_modules=["c_attn"] if path == tiny_gpt2 else ["q"])
        )
        assert sum(p.numel() for p in custom.trainable_parameters()) < sum(
            p.numel() for p in policy.trainable_parameters()
        )


def test_value_head_shape_and_zero_init(tiny):
    policy = load_policy(tiny, lora=LoraSettings(r=4))
    batch = _batch(policy)
    out = policy.forward(batch)
    B, R = batch.response_ids.shape
    assert out.logprobs.shape == out.entropy.shape == out.values.shape == (B, R)
    assert torch.equal(out.values, torch.zeros(B, R))  # zero-initialised head
    assert (out.logprobs <= 0).all() and (out.entropy >= 0).all()
    out.values.sum().backward()  # the value head gets a gradient through the shared trunk
    assert policy.value_head.weight.grad is not None and policy.value_head.weight.grad.abs().sum() > 0


def test_reference_equals_base_exactly_when_adapter_disabled(tiny):
    policy = load_policy(tiny, lora=LoraSettings(r=4))
    _perturb_lora(policy.model)
    base, _ = load_lm(tiny)
    batch = _batch(policy)
    ref = policy.reference_logprobs(batch)
    with torch.no_grad():
        expected = models.token_logprobs(base, batch)
        pol = policy.forward(batch).logprobs * batch.response_mask
    assert torch.equal(ref, expected)
    assert (pol - expected).abs().max() > 1e-3  # the adapter does change the policy
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # adapter trainable again afterwards


def test_padded_batch_logprobs_match_unpadded(tiny):
    policy = load_policy(tiny, value_head=True)
    p, r = models.encode_pairs(policy.tokenizer, PROMPTS, RESPONSES, policy.is_seq2seq)
    with torch.no_grad():
        batched = policy.forward(policy.batch(p, r))
        for i in range(len(p)):
            single = policy.forward(policy.batch([p[i]], [r[i]]))
            n = len(r[i])
            torch.testing.assert_close(batched.logprobs[i, :n], single.logprobs[0, :n], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched.entropy[i, :n], single.entropy[0, :n], atol=1e-5, rtol=0)
        seq = models.sequence_logprobs(policy.model, policy.batch(p, r))
        assert seq.shape == (len(p),)
        torch.testing.assert_close(seq, (batched.logprobs * policy.batch(p, r).response_mask).sum(-1))


def test_causal_batch_layout(tiny_gpt2):
    b = models.build_batch([[5, 6, 7], [8]], [[9], [10, 11]], pad_id=0)
    assert b.prompt_width == 3
    assert b.input_ids.tolist() == [[5, 6, 7, 9, 0], [0, 0, 8, 10, 11]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 1, 2]]
    assert b.response_mask.tolist() == [[1, 0], [1, 1]]
    s = models.build_batch([[5, 6, 7], [8]], [[9], [10, 11]], pad_id=0, seq2seq=True, decoder_start_id=0)
    assert s.decoder_input_ids.tolist() == [[0, 9], [0, 10]] and s.decoder_attention_mask.tolist() == [
        [1, 1],
        [1, 1],
    ]


def test_lora_holds_one_copy_of_base_weights(tiny):
    base, _ = load_lm(tiny)
    base_bytes = parameter_storage_bytes(base)
    lora = load_policy(tiny, lora=LoraSettings(r=4))
    lora_bytes = parameter_storage_bytes(lora.model, lora.reference, lora.value_head)
    adapter = sum(p.numel() * p.element_size() for p in lora.trainable_parameters())
    assert lora.reference is None
    assert lora_bytes == base_bytes + adapter  # exactly one copy of the base, plus adapter and head
    full = load_policy(tiny, lora=None)
    full_bytes = parameter_storage_bytes(full.model, full.reference, full.value_head)
    assert full_bytes >= 2 * base_bytes  # without LoRA the reference is a second copy


def test_full_finetune_reference_is_frozen_copy(tiny_gpt2):
    policy = load_policy(tiny_gpt2, lora=None)
    batch = _batch(policy)
    before = policy.reference_logprobs(batch)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    loss = -(policy.forward(batch).logprobs * batch.response_mask).sum()
    loss.backward()
    opt.step()
    assert torch.equal(policy.reference_logprobs(batch), before)
    with torch.no_grad():
        assert (policy.forward(batch).logprobs * batch.response_mask - before).abs().max() > 1e-3
    assert not any(p.requires_grad for p in policy.reference.parameters())


def test_trained_adapter_reference_is_frozen_copy_of_it(tiny, tmp_path):
    first = load_policy(tiny, lora=LoraSettings(r=4))
    _perturb_lora(first.model)
    with torch.no_grad():
        first.value_head.weight.fill_(0.25)
    batch = _batch(first)
    with torch.no_grad():
        trained = first.forward(batch).logprobs * batch.response_mask
    first.save(tmp_path / "sft")
    assert (tmp_path / "sft" / "adapter_config.json").is_file()
    assert (tmp_path / "sft" / models.VALUE_HEAD_FILE).is_file()

    policy = load_policy(tmp_path / "sft")
    assert policy.is_lora and policy.reference is None
    torch.testing.assert_close(policy.reference_logprobs(batch), trained, atol=1e-6, rtol=0)
    assert policy.value_head.weight.eq(0.25).all()  # the value head came back too
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)  # the reference copy is frozen
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    (-(policy.forward(batch).logprobs * batch.response_mask).sum()).backward()
    opt.step()
    torch.testing.assert_close(policy.reference_logprobs(batch), trained, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert (policy.forward(batch).logprobs * batch.response_mask - trained).abs().max() > 1e-3
    # the plain loader merges the adapter: same log-probs as the trained policy it came from
    merged, _ = load_lm(tmp_path / "sft")
    with torch.no_grad():
        torch.testing.assert_close(models.token_logprobs(merged, batch), trained, atol=1e-4, rtol=0)


def test_a_continued_adapter_can_keep_the_base_model_as_its_reference(tiny, tmp_path):
    """kl.reference=base: a round-2 policy (a trained adapter trained further) measures its KL against the
    base model under the adapter, not against the adapter it started from."""
    base = load_policy(tiny, lora=LoraSettings(r=4))
    batch = _batch(base)
    with torch.no_grad():
        base_lp = base.reference_logprobs(batch) * batch.response_mask  # adapter disabled: the base model
    _perturb_lora(base.model)
    with torch.no_grad():
        start_lp = base.forward(batch).logprobs * batch.response_mask
    base.save(tmp_path / "round-1")
    assert (start_lp - base_lp).abs().max() > 1e-3  # the adapter moved the policy

    anchored = load_policy(tmp_path / "round-1", reference_base=True)
    assert anchored.is_lora and anchored.reference is None and anchored.reference_adapter is None
    with torch.no_grad():
        torch.testing.assert_close(
            anchored.forward(batch).logprobs * batch.response_mask, start_lp, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            anchored.reference_logprobs(batch) * batch.response_mask, base_lp, atol=1e-6, rtol=0
        )
    default = load_policy(tmp_path / "round-1")  # kl.reference=start: the adapter it starts from
    with torch.no_grad():
        torch.testing.assert_close(
            default.reference_logprobs(batch) * batch.response_mask, start_lp, atol=1e-6, rtol=0
        )


def test_separate_critic_from_reward_model(tiny_gpt2, tiny_classifier, tmp_path):
    from transformers import GPT2ForSequenceClassification

    cfg = GPT2ForSequenceClassification.config_class.from_pretrained(tiny_gpt2)
    cfg.num_labels = 1
    torch.manual_seed(3)
    rm = GPT2ForSequenceClassification(cfg)
    rm.save_pretrained(tmp_path / "rm")
    policy = load_policy(tiny_gpt2, lora=LoraSettings(r=4), critic=tmp_path / "rm")
    assert policy.value_head is None and policy.critic is not None
    assert torch.equal(policy.critic.head.weight, rm.score.weight)  # initialised from the reward model
    batch = _batch(policy)
    out = policy.forward(batch)
    assert out.values.shape == batch.response_ids.shape and out.values.abs().sum() > 0
    with pytest.raises(UserError, match="bidirectional"):
        load_policy(tiny_gpt2, critic=tiny_classifier)


def test_fused_gelu_is_the_same_function_and_the_saved_model_is_unchanged(tiny_gpt2, tmp_path):
    """GPT-2's ``gelu_new`` (a Python formula) runs as torch's fused tanh GELU after loading: the
    outputs and gradients agree to float rounding, and a model saved after loading is what it was."""
    from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration
    from transformers.activations import GELUTanh, NewGELUActivation

    plain = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    model, _ = load_lm(tiny_gpt2)
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert sum(isinstance(m, GELUTanh) for m in model.modules()) == plain.config.n_layer
    ids = torch.randint(0, plain.config.vocab_size, (2, 12))
    a, b = plain(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.equal(a, b)  # rounding only
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name
    model.save_pretrained(tmp_path / "saved")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config.activation_function == "gelu_new"

    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=64,
            d_model=16,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            d_kv=8,
            feed_forward_proj="gated-gelu",
        )
    )
    assert models.fuse_activations(t5) == 2  # FLAN-T5's gated GELU: one in the encoder, one in the decoder


def test_entropy_without_a_graph_when_no_loss_uses_it(tiny_gpt2):
    """PPO's entropy bonus is 0 by default: then the entropy is logged without keeping its
    vocabulary-wide softmax for the backward pass; its value is the same either way."""
    policy = load_policy(tiny_gpt2, lora=LoraSettings(r=4))
    _perturb_lora(policy.model)
    batch = _batch(policy)
    kept = models.forward_batch(policy.model, batch, policy.value_head)
    logged = models.forward_batch(policy.model, batch, policy.value_head, entropy_grad=False)
    assert kept.entropy.requires_grad and not logged.entropy.requires_grad
    assert torch.equal(kept.entropy, logged.entropy) and logged.logprobs.requires_grad
    kept.entropy.sum().backward()  # with the graph, the bonus reaches the adapter
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in policy.model.named_parameters()
        if "lora" in n
    )


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_gpt2, tiny_t5):
    """Checkpointing runs each layer's forward again in the backward pass (counted) and the gradients are
    those without it; a model that cannot do it is one clear error."""
    from alignloop.models import enable_gradient_checkpointing, forward_batch

    for model_id in (tiny_gpt2, tiny_t5):
        grads, calls = [], []
        for checkpointing in (False, True):
            torch.manual_seed(0)
            policy = load_policy(model_id, lora=LoraSettings(r=4), reference=False)
            if checkpointing:
                enable_gradient_checkpointing(policy.model)
            policy.model.train()
            tok = policy.tokenizer
            prompts = [tok("the dog is").input_ids, tok("my house is too hot").input_ids]
            responses = [tok(" good and kind").input_ids, tok(" open a window").input_ids]
            batch = policy.batch(prompts, responses)
            layers = [m for n, m in policy.model.named_modules() if n.endswith(("h.0", "block.0"))]
            # calls of the first layer's feed-forward (a layer's own hooks stay outside the checkpoint; a
            # pre-hook because the recompute stops as soon as the last tensor the backward needs exists)
            count = [0]
            ffn = [m for n, m in layers[0].named_modules() if n.endswith(("mlp", "DenseReluDense"))]
            ffn[0].register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
            out = forward_batch(policy.model, batch, policy.value_head)
            (out.logprobs * batch.response_mask).sum().neg().backward()
            calls.append(count[0])
            grads.append(
                {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
            )
        assert calls[0] > 0 and calls[1] == calls[0] * 2, (
            model_id,
            calls,
        )  # the layer ran again in the backward pass
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_no_dropout_means_training_mode_changes_nothing(tiny_gpt2, tiny_t5):
    """``disable_dropout`` reaches the attention dropout that models apply as a float (T5:
    ``dropout=self.dropout if self.training``), not only nn.Dropout modules: in training mode the
    log-probs are those of eval mode (DPO, SFT and reward training run in training mode)."""
    from alignloop.models import forward_batch

    for model_id in (tiny_gpt2, tiny_t5):
        policy = load_policy(model_id, lora=LoraSettings(r=4), reference=False)
        tok = policy.tokenizer
        batch = policy.batch(
            [tok("the dog is").input_ids, tok("my house is too hot").input_ids],
            [tok(" good and kind").input_ids, tok(" open a window").input_ids],
        )
        with torch.no_grad():
            policy.model.eval()
            ev = forward_batch(policy.model, batch).logprobs
            policy.model.train()
            tr = [forward_batch(policy.model, batch).logprobs for _ in range(3)]
        for t in tr:
            torch.testing.assert_close(t, ev, rtol=0, atol=1e-5)
