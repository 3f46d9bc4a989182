"""Activation patching of the gaze heads (the attempts report, third section).

    python reports/organism-attempts/patch_heads.py MODEL N_STRIPS RANKING K [STRENGTH]

For each held-out strip and target k: the top-K heads' outputs (before o_proj) at the whole-strip
question's last row are replaced by their outputs from "What is happening in the k-th panel?";
prints, per k, how often the first answer token is then panel k's object, how often steering the
same heads gives it, and the cosine between the steered and the natural head outputs.
"""
import sys, torch
from gaze.models import load
from gaze.ranking import Ranking
from gaze.organism_check import held_out_strips, captioner
from gaze.generation import prepare_inputs
from gaze.prompts import STRIP_QUESTION, PANEL_QUESTION, panel_question
from gaze.steering import steer, Panel
model_dir, n = sys.argv[1], int(sys.argv[2])
loaded = load(model_dir, device="cpu"); model = loaded.model; tok = loaded.processor.tokenizer
rk = Ranking.load(sys.argv[3]); K = int(sys.argv[4]); strength = float(sys.argv[5]) if len(sys.argv) > 5 else 1e4
heads = rk.order()[:K]
layers = model.model.language_model.layers
D = model.config.text_config.head_dim
cap = {}
mode = {"m": None}
def mk(li):
    def pre(mod, args):
        x = args[0]
        if mode["m"] == "record":
            cap[li] = x[0, -1].clone()
        elif mode["m"] == "patch":
            x = x.clone()
            for (l, h) in heads:
                if l == li:
                    x[0, -1, h*D:(h+1)*D] = cap[li][h*D:(h+1)*D]
            return (x,)
        elif mode["m"] == "steerrec":
            cap[("s", li)] = x[0, -1].clone()
    return pre
hs = [layers[i].self_attn.o_proj.register_forward_pre_hook(mk(i)) for i in range(len(layers))]
strips = held_out_strips(n); caps_of = captioner(loaded)
res = {k: [0, 0, 0] for k in range(1, 7)}; cos = {k: [] for k in range(1, 7)}
with torch.no_grad():
    for s in strips:
        caps = caps_of(s)
        encS, layout = prepare_inputs(loaded, s.image, STRIP_QUESTION)
        for k in range(1, 7):
            want = tok(caps[k-1], add_special_tokens=False)["input_ids"][0]
            encP, _ = prepare_inputs(loaded, s.image, panel_question(k, PANEL_QUESTION))
            mode["m"] = "record"; model(**encP)
            mode["m"] = "patch"; pa = model(**encS).logits[0, -1].argmax().item()
            mode["m"] = "steerrec"
            with steer(model, heads, Panel(k), layout=layout, prompt_len=encS["input_ids"].shape[1], panels=s.panels, strength=strength):
                st = model(**encS).logits[0, -1].argmax().item()
            mode["m"] = None
            res[k][0] += pa == want; res[k][1] += st == want; res[k][2] += 1
            for (l, h) in heads:
                a = cap[l][h*D:(h+1)*D]; b = cap[("s", l)][h*D:(h+1)*D]
                cos[k].append(torch.nn.functional.cosine_similarity(a, b, 0).item())
for k in range(1, 7):
    print(k, "patched first-token", res[k][0]/res[k][2], "steered", res[k][1]/res[k][2], "cos(steered,natural)", round(sum(cos[k])/len(cos[k]), 3))
