import math, sys, time, tempfile
from pathlib import Path
import numpy as np, torch, tiktoken
import pyarrow as pa, pyarrow.parquet as pq
from pipeline.tokenizer import ChatTokenizer, SPLIT_PATTERN, SPECIAL_TOKENS
from pipeline.render import render_for_completion
from trainer.config import GPTConfig
from trainer.model import GPT
from trainer import evaluate as ev
from trainer.engine import Engine

tok = ChatTokenizer(tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN,
    mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}))
dev = "cuda"
def build(cfg):
    with torch.device("meta"):
        m = GPT(cfg)
    m.to_empty(device=dev); m.init_weights()
    with torch.no_grad(): m.lm_head.weight.normal_(0, 0.05)
    return m.eval()
torch.manual_seed(0)
m = build(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_kv_head=4, n_embd=256))
print("dtype", m.dtype)
g = torch.Generator().manual_seed(1)
batches = [(torch.randint(0, 256, (4, 128), generator=g), torch.randint(0, 256, (4, 128), generator=g)) for _ in range(3)]
with torch.no_grad():
    ml = sum(float(m(x.to(dev), y.to(dev))) for x, y in batches) / 3
bpb = ev.evaluate_bpb(m, batches, np.ones(tok.vocab_size, np.int32))
print("bpb", bpb, "mean-loss bits", ml / math.log(2))
prompt = render_for_completion({"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": ""}]}, tok)
eng = Engine(m, tok)
out = eng.generate(prompt, max_tokens=20)
ids = list(prompt)
with torch.no_grad():
    for _ in range(20):
        t = int(m(torch.tensor([ids], device=dev))[0, -1].argmax())
        if t in (tok.bos_id, tok.special_id("<|assistant_end|>")): break
        ids.append(t)
print("greedy matches manual:", out == ids[len(prompt):], len(out))
print("sampled", eng.generate(prompt, max_tokens=10, temperature=1.0, seed=3) == eng.generate(prompt, max_tokens=10, temperature=1.0, seed=3))
d = Path(tempfile.mkdtemp()); f = d / "task_data/allenai--ai2_arc/ARC-Easy/test"; f.mkdir(parents=True)
rows = [{"question": f"q{i} " + "x" * i, "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]} for i in range(50)]
pq.write_table(pa.Table.from_pylist(rows), f / "00000.parquet")
t0 = time.time()
print(ev.chatcore(m, tok, d, max_sample=2, batch_size=8, max_tokens=16), f"{time.time()-t0:.1f}s")
# cost of KV-cache-free generation for a d20-sized model
big = build(GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280))
p = list(np.random.default_rng(0).integers(0, 32000, 400))
class T:  # a tokenizer stand-in with the special ids of a 32768 vocab
    bos_id = 32759
    def special_id(self, n): return 32759 + SPECIAL_TOKENS.index(n)
    def decode(self, ids): return ""
    def encode(self, s): return []
e = Engine(big, T())
with torch.no_grad(): big(torch.tensor([p], device=dev))
torch.cuda.synchronize(); t0 = time.time()
o = e.generate(p, max_tokens=512)
torch.cuda.synchronize()
print(f"d20 no-KV-cache generation: {len(o)} tokens in {time.time()-t0:.2f}s from a 400-token prompt")
