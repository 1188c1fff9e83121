"""The loop's own duties, on a toy denoiser whose gradient is known exactly."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from diffusion_trainer.objectives import NoisyBatch
from diffusion_trainer.reporting import Reporter
from diffusion_trainer.run import loop

POINTS = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-1.0, 1.0]])


class Points(torch.utils.data.Dataset):
    def __len__(self):
        return len(POINTS)

    def __getitem__(self, i):
        return {"x": POINTS[i]}

    def set_epoch(self, epoch):
        pass


class ToyFamily:
    """Denoiser = a linear map; the target is always zero, so loss = mean((W x)^2)."""

    def noisy_input_and_target(self, latents):
        return NoisyBatch(latents, torch.zeros_like(latents), torch.zeros(len(latents)))

    def predict(self, denoiser, noisy, conditioning, batch):
        return denoiser(noisy.model_input)


class ToyInputs:
    def latents(self, batch):
        return batch["x"]

    def conditioning(self, batch):
        return {}

    def loss_mask(self, batch, latents):
        return None


class NoEval:
    def due(self, epoch):
        return False


def gradient_of_one_step(batch_size, accumulation):
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    denoiser = torch.nn.Linear(2, 2, bias=False)
    seen = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(denoiser.weight.grad.clone())
            return super().step(closure)

    optimizer = RecordingSGD(denoiser.parameters(), lr=0.0)
    dataloader = torch.utils.data.DataLoader(Points(), batch_size=batch_size, shuffle=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    prepared, optimizer, dataloader, scheduler = accelerator.prepare(denoiser, optimizer, dataloader, scheduler)
    loop.run(loop.Training(
        accelerator=accelerator, family=ToyFamily(), denoiser=prepared, trainable=list(denoiser.parameters()),
        optimizer=optimizer, lr_scheduler=scheduler, dataloader=dataloader, samples=Points(), inputs=ToyInputs(),
        evaluator=NoEval(), reporter=Reporter(), ema=None, loss_type="l2", huber_c=0.1, max_grad_norm=0.0,
        num_epochs=1, total_steps=1))
    return seen, denoiser.weight.detach()


def test_accumulated_gradient_is_the_mean_over_the_effective_batch():
    """Predecessor fault: the loss was not divided by the accumulation steps."""
    whole, weight = gradient_of_one_step(batch_size=4, accumulation=1)
    accumulated, _ = gradient_of_one_step(batch_size=1, accumulation=4)
    assert len(whole) == len(accumulated) == 1
    # d/dW mean over samples and outputs of (W x)^2 = 2 W (sum_i x_i x_i^T) / (n * outputs)
    expected = 2 * weight @ (POINTS.T @ POINTS) / (len(POINTS) * 2)
    assert torch.allclose(whole[0], expected, atol=1e-6)
    assert torch.allclose(accumulated[0], expected, atol=1e-6)
