"""The vLLM sampling path up to the engine call, with a fake engine (vLLM is not installed)."""

from types import SimpleNamespace

import pytest

import megatron_gem.eval as E
from megatron_gem.eval import vllm_sampling as V

LETTERS = "abcdefghijklm"


def char_format():
    # ids: 0 pad, 1 bos, 2 eos, 3.. letters; stop also at 99 (an end-of-turn token)
    return E.ChatFormat(
        encode=lambda s: [3 + LETTERS.index(c) for c in s if c in LETTERS],
        decode=lambda ids: "".join(LETTERS[i - 3] for i in ids if 3 <= i < 3 + len(LETTERS)),
        render=lambda msgs: msgs[-1]["content"],
        eos_id=2,
        pad_id=0,
        bos_id=1,
        stop_ids=(99,),
    )


class FakeLLM:
    """Records what it is asked; answers completion j of prompt i with letters, then a stop id
    and tokens after it (which must be cut), returning completions out of index order."""

    def __init__(self):
        self.calls = []

    def generate(self, inputs, sampling_params, use_tqdm):
        self.calls.append((inputs, sampling_params))
        out = []
        for i, (x, p) in enumerate(zip(inputs, sampling_params)):
            comps = [
                SimpleNamespace(index=j, token_ids=(3 + i, 3 + j, 2 if j % 2 else 99, 5, 6))
                for j in range(p["n"])
            ]
            out.append(SimpleNamespace(prompt_token_ids=x["prompt_token_ids"], outputs=comps[::-1]))
        return out


def test_sampling_params_mapping():
    fmt = char_format()
    cfg = E.SamplingConfig(n=8, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=64, seed=5)
    assert V.sampling_params(cfg, fmt, 3) == {
        "n": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": 64,
        "seed": 8,
        "stop_token_ids": [2, 99],
        "detokenize": False,
    }
    off = V.sampling_params(E.SamplingConfig(top_k=0), fmt)
    assert off["top_k"] == -1 and off["n"] == 16  # HF's top_k=0 (off) is vLLM's -1
    greedy = V.sampling_params(E.SamplingConfig(n=4, temperature=0, top_p=0.5, top_k=3), fmt)
    assert (greedy["n"], greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (1, 0, 1, -1)


def test_sample_vllm_with_a_fake_engine():
    fmt = char_format()
    msgs = [[{"role": "user", "content": "abc"}], [{"role": "user", "content": "d"}]]
    llm = FakeLLM()
    got = V.sample_vllm(llm, fmt, msgs, E.SamplingConfig(n=3, seed=1), params_class=dict)
    inputs, params = llm.calls[0]
    assert inputs == [{"prompt_token_ids": [1, 3, 4, 5]}, {"prompt_token_ids": [1, 6]}]
    assert inputs[0]["prompt_token_ids"] == fmt.prompt_ids(msgs[0])
    assert [p["seed"] for p in params] == [1, 2]
    # completion j of prompt i: letters (i, j), cut at the stop id, in index order
    assert got == [["aa", "ab", "ac"], ["ba", "bb", "bc"]]
    greedy = V.sample_vllm(FakeLLM(), fmt, msgs, E.SamplingConfig(n=3, temperature=0), dict)
    assert greedy == [["aa"] * 3, ["ba"] * 3]

    class Short(FakeLLM):
        def generate(self, inputs, sampling_params, use_tqdm):
            return super().generate(inputs, sampling_params, use_tqdm)[:1]

    with pytest.raises(ValueError, match="1 results for 2 prompts"):
        V.sample_vllm(Short(), fmt, msgs, E.SamplingConfig(n=2), dict)
    with pytest.raises(ValueError, match="needs the vllm package"):
        V.load_vllm("some_dir")
