"""Tiny models for the task tests (named by recipes as ``tests.seg_models:<name>``)."""
import torch
from torch import nn


class QuarterResSegmenter(nn.Module):
    """Predicts at 1/4 of the input resolution (as Segformer does): compress resizes to the labels."""

    def __init__(self, num_classes: int = 11, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return self.head(self.body(x))


def segmenter(num_classes: int = 11, width: int = 8) -> nn.Module:
    return QuarterResSegmenter(num_classes, width)


def tiny_bert(num_classes: int = 2) -> nn.Module:
    """A BERT-style classifier from a small config (no download): dict inputs input_ids + attention_mask."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=num_classes)
    return BertForSequenceClassification(cfg)


class Tokens(torch.utils.data.Dataset):
    """Token sequences whose label is whether token 5 occurs: dict inputs, as a tokenizer gives them."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(6, 32, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        pos = torch.randint(1, 12, (n,), generator=g)
        self.ids[self.labels == 1, pos[self.labels == 1]] = 5
        self.mask = torch.ones(n, 12, dtype=torch.long)
        self.mask[:, 10:] = 0  # padding at the end

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


def token_data(cfg, *, seed):
    return {"train": Tokens(96, seed), "test": Tokens(32, seed + 1), "num_classes": 2}


def l1_loss(output, targets):
    """A custom task's loss: per-pixel cross-entropy plus nothing fancy (tests the plumbing)."""
    from compress.tasks.segmentation import dense_logits

    return nn.functional.cross_entropy(dense_logits(output, targets.shape[-2:]), targets)


def pixel_hits(output, targets):
    from compress.tasks.segmentation import dense_logits

    return float((dense_logits(output, targets.shape[-2:]).argmax(1) == targets).float().mean() * 100)
