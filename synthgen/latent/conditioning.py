"""TaxaDiffusion-style taxonomy conditioning for a frozen Stable Diffusion text encoder.

Each rank's text ("genus: Megaptera") goes through the frozen text encoder once (cached); a
small per-rank module maps it to a residual that is summed into the cross-attention context on
top of the base prompt's encoding. The last layer of every module starts at zero, so training
begins exactly at the pretrained model and each new rank (progressive stages) starts neutral.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from synthgen.latent.loading import SDComponents


@torch.no_grad()
def encode_texts(sd: SDComponents, texts: Sequence[str], device: torch.device) -> dict[str, tuple]:
    """Encode unique strings with the frozen encoder(s): text -> (tokens [L, D], pooled [P] or None).

    SD 1.x/2.x use the last hidden state; SDXL concatenates both encoders' penultimate states and
    takes the pooled projection of the second, as the SDXL pipeline does.
    """
    out: dict[str, tuple] = {}
    for text in dict.fromkeys(texts):
        seqs, pooled = [], None
        for tok, te in zip(sd.tokenizers, sd.text_encoders, strict=True):
            ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            if sd.family == "sdxl":
                o = te(ids, output_hidden_states=True)
                seqs.append(o.hidden_states[-2][0])
                if hasattr(o, "text_embeds"):
                    pooled = o.text_embeds[0]
            else:
                seqs.append(te(ids)[0][0])
        out[text] = (torch.cat(seqs, dim=-1).float(), None if pooled is None else pooled.float())
    return out


def rank_texts(lineage: dict[str, str], levels: Sequence[str], template: str) -> list[str | None]:
    """One text per level ("genus: Megaptera"), None where the taxon has no ancestor at that level."""
    texts: list[str | None] = []
    for level in levels:
        name = lineage.get(level)
        texts.append(template.format(level=level.split(":")[-1] if ":" in level else level, name=name)
                     if name else None)
    return texts


class RankModule(nn.Module):
    """Per-token MLP residual for one rank; zero-initialised output."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class TaxonomyConditioner(nn.Module):
    """One RankModule per taxonomy level; `forward` sums the active ranks into the base context."""

    def __init__(self, levels: Sequence[str], dim: int, hidden: int):
        super().__init__()
        self.levels = list(levels)
        self.dim, self.hidden = dim, hidden
        self.ranks = nn.ModuleList(RankModule(dim, hidden) for _ in self.levels)

    def forward(self, base: torch.Tensor, rank_embs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """base [B, L, D]; rank_embs [B, R, L, D]; mask [B, R] (1 = this rank conditions the sample)."""
        ctx = base
        for r, module in enumerate(self.ranks):
            if r >= rank_embs.shape[1]:
                break
            m = mask[:, r]
            if bool(m.any()):
                ctx = ctx + m[:, None, None] * module(rank_embs[:, r])
        return ctx


class ContextBuilder:
    """Turns lineages (+ how many levels to keep) into UNet conditioning, from cached encodings."""

    def __init__(self, sd: SDComponents, levels: Sequence[str], template: str, base_prompt: str,
                 device: torch.device):
        self.sd, self.levels, self.template, self.base_prompt = sd, list(levels), template, base_prompt
        self.device = device
        self.cache: dict[str, tuple] = encode_texts(sd, ["", base_prompt], device)

    def ensure(self, lineages: Sequence[dict[str, str]]) -> None:
        """Encode any rank text not yet cached (the encoder is frozen, so once is enough)."""
        new = [t for lin in lineages for t in rank_texts(lin, self.levels, self.template)
               if t is not None and t not in self.cache]
        if new:
            self.cache.update(encode_texts(self.sd, new, self.device))

    def prompt(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plain prompts (DreamBooth, unconditional): [B, L, D] and pooled [B, P] (SDXL)."""
        missing = [t for t in texts if t not in self.cache]
        if missing:
            self.cache.update(encode_texts(self.sd, missing, self.device))
        seq = torch.stack([self.cache[t][0] for t in texts])
        pooled = self.cache[texts[0]][1]
        return seq, None if pooled is None else torch.stack([self.cache[t][1] for t in texts])

    def taxonomy(self, conditioner: TaxonomyConditioner, lineages: Sequence[dict[str, str]],
                 depths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context for each lineage using its first `depth` levels; depth 0 = unconditional."""
        self.ensure(lineages)
        n_lv = max(1, max(depths, default=1))
        base_texts = [self.base_prompt if d > 0 else "" for d in depths]
        base, pooled = self.prompt(base_texts)
        L, D = base.shape[1:]
        embs = torch.zeros(len(lineages), n_lv, L, D, device=self.device)
        mask = torch.zeros(len(lineages), n_lv, device=self.device)
        for i, (lin, d) in enumerate(zip(lineages, depths, strict=True)):
            for r, text in enumerate(rank_texts(lin, self.levels, self.template)[:d]):
                if text is not None:
                    embs[i, r] = self.cache[text][0]
                    mask[i, r] = 1.0
        return conditioner(base, embs, mask), pooled


def unet_kwargs(sd: SDComponents, pooled: torch.Tensor | None, height: int, width: int,
                batch: int, device: torch.device) -> dict[str, Any]:
    """SDXL's micro-conditioning (pooled text + size/crop ids); empty for SD 1.x/2.x."""
    if sd.family != "sdxl":
        return {}
    time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1)}}
