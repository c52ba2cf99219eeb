"""Plain PyTorch architectures that recipes name with ``arch``."""

from __future__ import annotations

from torch import Tensor, nn

from distill.registry import Registry

__all__ = ["ARCHITECTURES", "ConvNet", "MLP"]


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvNet(nn.Module):
    """A VGG-style image classifier: two stages of two 3x3 convolutions, then a linear head.

    Args:
        width: Channels of the first stage; the second stage has twice as many. Parameters
            grow with ``width**2``, so halving it makes a model about 4x smaller.
        in_channels: Image channels (1 for grayscale).
        num_classes: Output classes.
        dropout: Dropout before the head.
    """

    def __init__(self, width: int = 32, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_block(in_channels, w),
            *_conv_block(w, w),
            nn.MaxPool2d(2),
            *_conv_block(w, 2 * w),
            *_conv_block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * w, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` images to ``(N, num_classes)`` logits."""
        return self.head(self.features(x))


class MLP(nn.Module):
    """A multilayer perceptron on flattened images.

    Args:
        hidden: Width of each hidden layer.
        depth: Number of hidden layers.
        in_features: Flattened input size (784 for 28x28).
        num_classes: Output classes.
        dropout: Dropout after each hidden layer.
    """

    def __init__(
        self, hidden: int = 128, depth: int = 2, in_features: int = 784, num_classes: int = 10, dropout: float = 0.1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, hidden), nn.ReLU(), nn.Dropout(dropout)]
            size = hidden
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, ...)`` inputs to ``(N, num_classes)`` logits."""
        return self.net(x)


ARCHITECTURES: Registry[type[nn.Module]] = Registry("architecture")
ARCHITECTURES.add("convnet", ConvNet)
ARCHITECTURES.add("mlp", MLP)
