"""Small in-memory datasets following the model input contract (shared by training tests)."""

import torch
from torch.utils.data import Dataset

PHRASES = {
    0: ["pothole on the road", "crack on the street", "damaged road near the bridge"],
    1: ["graffiti on the bench", "graffiti near the park", "sign is damaged by graffiti"],
    2: ["street light is dark", "broken light at the park", "light missing on the bridge"],
}


class RecordingDataset(Dataset):
    """A list of items that remembers which indices were read (to see the Poisson batch)."""

    def __init__(self, items):
        self.items = items
        self.reads = []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self.items[i]


def make_items(model, n, *, seed=0, max_length=12, missing=False):
    """``n`` labelled items for ``model``'s kind; the label is visible in text and image."""
    info = model.processor_info
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        label = i % info.num_classes
        item = {"labels": torch.tensor(label)}
        if info.tokenizer is not None:
            text = PHRASES[label % 3][int(torch.randint(0, 3, (1,), generator=g))]
            enc = info.tokenizer(text, padding="max_length", truncation=True,
                                 max_length=max_length, return_tensors="pt")
            item["input_ids"] = enc["input_ids"][0]
            item["attention_mask"] = enc["attention_mask"][0]
        if info.image_size is not None:
            size = info.image_size
            pixels = torch.randn(3, size, size, generator=g) * 0.5
            pixels[label % 3] += 1.0
            item["pixel_values"] = pixels
        if info.kind == "fusion":
            item["text_present"] = torch.tensor(0 if missing and i % 3 == 1 else 1)
            item["image_present"] = torch.tensor(0 if missing and i % 3 == 2 else 1)
        items.append(item)
    return items
