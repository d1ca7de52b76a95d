"""The plain reference of top-k recommendation that the engine is tested against: the reference
denoiser (inference.predict_h0) batch by batch from one generator, the seed-averaged softmax over the
whole catalog in float64, exclusions, and ties to the smaller id."""

import torch
import torch.nn.functional as F

from diffrec_ext.inference import inference_input, predict_h0


@torch.no_grad()
def reference_recommend(model, histories, k, exclude_seen=True, num_samples=10, algorithm="alg3", seed=0, stride=1,
                        batch_size=256):
    """(ids [B, k] int64, scores [B, k] float32) for dense-id histories, in their order."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    weight, bias = model.item_layer()
    ids_out, scores_out = [], []
    for start in range(0, len(histories), batch_size):
        chunk = [[int(i) for i in history if int(i) > 0] for history in histories[start:start + batch_size]]
        hidden = predict_h0(model, inference_input(model, chunk), num_samples, algorithm, generator, stride)
        logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
        probs = torch.softmax(logits, dim=-1).mean(dim=1)
        probs[:, 0] = float("-inf")
        if exclude_seen:
            for row, history in enumerate(chunk):
                probs[row, history] = float("-inf")
        order = torch.sort(-probs, dim=1, stable=True).indices[:, :k]  # stable: ties to the smaller id
        ids_out.append(order)
        scores_out.append(probs.gather(1, order).float())
    return torch.cat(ids_out), torch.cat(scores_out)
