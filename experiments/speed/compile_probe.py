"""Probe: does torch.compile of a dense decode step (static KV cache, gpt-fast style) pay on this CPU?
Times HF generate, the eager step and the compiled step in interleaved rounds (32 tokens each)."""
import torch, time, statistics
import torch.nn.functional as F
from gateskip.loading import load_model
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m")
cfg = model.config
L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
CAP = 128
kb = torch.zeros(L, 1, H, CAP, D); vb = torch.zeros_like(kb)
inner = model.model
def rot(x):
    a, b = x.chunk(2, -1); return torch.cat((-b, a), -1)
def step(tokid, pos, kb, vb):
    h = inner.embed_tokens(tokid)
    cos, sin = inner.rotary_emb(h, pos[None])
    cos, sin = cos[:, None], sin[:, None]
    kpos = torch.arange(CAP)
    mask = (kpos <= pos)[None, None, None]
    for i, layer in enumerate(inner.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_proj(x).view(1, 1, -1, D).transpose(1, 2)
        k = a.k_proj(x).view(1, 1, -1, D).transpose(1, 2)
        v = a.v_proj(x).view(1, 1, -1, D).transpose(1, 2)
        q = q * cos + rot(q) * sin; k = k * cos + rot(k) * sin
        kb[i].index_copy_(2, pos, k); vb[i].index_copy_(2, pos, v)
        o = F.scaled_dot_product_attention(q, kb[i], vb[i], attn_mask=mask, enable_gqa=True, scale=a.scaling)
        h = h + a.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))
cstep = torch.compile(step, dynamic=False)
with torch.inference_mode():
    tokid = torch.tensor([[42]]); 
    t=time.time(); cstep(tokid, torch.tensor([0]), kb, vb); print("compile s", time.time()-t)
    def run(f, n=32):
        s=time.perf_counter()
        for p in range(n): f(tokid, torch.tensor([p]), kb, vb)
        return n/(time.perf_counter()-s)
    ids = tok("The history of the printing press begins", return_tensors="pt")["input_ids"]
    kw=dict(do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
    def hf(): s=time.perf_counter(); model.generate(ids, **kw); return 32/(time.perf_counter()-s)
    res={"eager":[], "compiled":[], "hf":[]}
    for r in range(3):
        res["eager"].append(run(step)); res["compiled"].append(run(cstep)); res["hf"].append(hf())
    print({k: round(statistics.median(v),2) for k,v in res.items()})
    a = step(tokid, torch.tensor([5]), kb, vb); b = cstep(tokid, torch.tensor([5]), kb, vb); print((a-b).abs().max())
