"""Network building blocks and architectures, written once for 2D and 3D.

Conventions
-----------
* Inputs are ``(B, C, *spatial)``; every class takes ``ndim`` (2 or 3) and picks its layers from it.
* Constructors are keyword-only; every network has ``config`` (a plain dict of its constructor
  arguments) and is registered in :data:`NETWORKS`, so ``build_network(network_config(net))``
  rebuilds the architecture of a checkpoint without unpickling anything.
* Networks that output a registration field output a **displacement in voxels of the grid they
  output on, components in array-axis order** (``warped = moving ∘ (id + u)``), and start at
  (almost) zero, i.e. the identity. Converting to world units is the job of the method using them
  (:func:`alignkit.spatial.voxel_to_world_vectors`).
* Level ``l`` of a multi-scale network has spatial size ``ceil(s / 2**l)``; see :mod:`alignkit.nets.unet`.

Papers (cited in the modules by first author and year):

* a survey of deep learning for image registration (optical flow, stereo, multimodal), §2.1:
  :func:`correlation`, after Dosovitskiy et al., FlowNet: Learning Optical Flow with Convolutional
  Networks, ICCV 2015;
* Zampieri et al., Coarse to fine non-rigid registration: a chain of scale-specific neural networks
  for multimodal image alignment with application to remote sensing, 2018, appendix A.1:
  :class:`PyramidUNet`, :class:`ScaleChain`;
* Shen et al., Networks for Joint Affine and Non-parametric Image Registration, CVPR 2019, §2.1
  (:class:`RecurrentAffineHead`) and §2.2 (:class:`UNet`);
* Jena, Chaudhari and Gee, Deep Implicit Optimization for Robust and Flexible Image Registration,
  2024, §4.2 / Fig. 9: :class:`LKUNet`, :class:`FeatureEncoder`;
* Dosovitskiy et al., FlowNet: Learning Optical Flow with Convolutional Networks, ICCV 2015, and Ilg
  et al., FlowNet 2.0, CVPR 2017: :class:`FlowNetS`, :class:`FlowNetC`, :class:`FlowNetStack`;
* Dong et al., Learning to Align Images using Weak Geometric Supervision, 3DV 2018, §4.4 / §5.3:
  :class:`SiameseDescriptor`, :class:`PseudoSiameseDescriptor`.
"""

from alignkit.nets.affine import (
    RecurrentAffineHead,
    compose_affine,
    warp_affine,
)
from alignkit.nets.blocks import (
    Activation,
    BlockKind,
    ConvBlock,
    DoubleConv,
    DownMode,
    Downsample,
    LargeKernelBlock,
    LargeKernelStage,
    Norm,
    ResidualBlock,
    UpMode,
    Upsample,
    make_activation,
    make_block,
    make_norm,
)
from alignkit.nets.correlation import Correlation, correlation, correlation_displacements
from alignkit.nets.descriptors import PseudoSiameseDescriptor, SiameseDescriptor
from alignkit.nets.flownet import FlowDecoder, FlowNetC, FlowNetS, FlowNetStack
from alignkit.nets.pyramid import (
    PyramidUNet,
    ScaleChain,
    apply_symmetry,
    compose_displacements,
    symmetry_group,
    symmetry_pull_field,
    symmetry_push_field,
    warp_voxels,
)
from alignkit.nets.registry import NETWORKS, build_network, network_config, register_network
from alignkit.nets.stereo import MatchingFeatures
from alignkit.nets.stereo_volume import CostVolumeStereo
from alignkit.nets.unet import Decoder, Encoder, FeatureEncoder, LKUNet, UNet

__all__ = [
    "NETWORKS",
    "Activation",
    "BlockKind",
    "ConvBlock",
    "Correlation",
    "CostVolumeStereo",
    "Decoder",
    "DoubleConv",
    "DownMode",
    "Downsample",
    "Encoder",
    "FeatureEncoder",
    "FlowDecoder",
    "FlowNetC",
    "FlowNetS",
    "FlowNetStack",
    "LKUNet",
    "LargeKernelBlock",
    "LargeKernelStage",
    "MatchingFeatures",
    "Norm",
    "PseudoSiameseDescriptor",
    "PyramidUNet",
    "RecurrentAffineHead",
    "ResidualBlock",
    "ScaleChain",
    "SiameseDescriptor",
    "UNet",
    "UpMode",
    "Upsample",
    "apply_symmetry",
    "build_network",
    "compose_affine",
    "compose_displacements",
    "correlation",
    "correlation_displacements",
    "make_activation",
    "make_block",
    "make_norm",
    "network_config",
    "register_network",
    "symmetry_group",
    "symmetry_pull_field",
    "symmetry_push_field",
    "warp_affine",
    "warp_voxels",
]
