//! Convolution building blocks shared by the backbones (and reused by the detector's heads).

use tch::{nn, Tensor};

use crate::flops;
use crate::norm::{Norm, NormSpec};
use crate::BackboneError;

/// How a convolution's weight is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConvInit {
    /// `kaiming_normal_` with fan-in and ReLU gain: std = sqrt(2 / fan_in) (the VoVNet authors' init).
    KaimingNormalFanIn,
    /// detectron2's `c2_msra_fill`: normal with std = sqrt(2 / fan_out).
    MsraFanOut,
    /// detectron2's `c2_xavier_fill`: uniform in ±sqrt(3 / fan_in).
    XavierFanIn,
    /// Normal with the given standard deviation.
    Normal(f64),
}

/// Options of a 2-D convolution beyond its channels and kernel size.
#[derive(Debug, Clone, Copy)]
pub struct ConvOpts {
    /// Stride in both directions.
    pub stride: i64,
    /// Zero padding in both directions; `None` means `kernel / 2` ("same" for odd kernels).
    pub padding: Option<i64>,
    /// Channel groups (the input width for depthwise convolutions).
    pub groups: i64,
    /// Whether the convolution has a bias; the bias starts at zero except for [`ConvInit::KaimingNormalFanIn`],
    /// which keeps PyTorch's default `U(±1/sqrt(fan_in))` as the VoVNet authors' code does.
    pub bias: bool,
    /// Weight initialisation.
    pub init: ConvInit,
}

impl Default for ConvOpts {
    fn default() -> Self {
        ConvOpts { stride: 1, padding: None, groups: 1, bias: false, init: ConvInit::KaimingNormalFanIn }
    }
}

/// A 2-D convolution that reports its multiply-accumulates to [`flops::count_macs`].
#[derive(Debug)]
pub struct Conv2d {
    /// Weight of shape `[out, in / groups, k, k]`.
    pub weight: Tensor,
    /// Optional bias of shape `[out]`.
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    groups: i64,
}

impl Conv2d {
    /// Creates a `kernel x kernel` convolution from `cin` to `cout` channels with variables `weight` (and `bias`)
    /// under `path`.
    pub fn new(path: &nn::Path, cin: i64, cout: i64, kernel: i64, opts: ConvOpts) -> Conv2d {
        let fan_in = (cin / opts.groups * kernel * kernel) as f64;
        let fan_out = (cout / opts.groups * kernel * kernel) as f64;
        let init = match opts.init {
            ConvInit::KaimingNormalFanIn => nn::Init::Randn { mean: 0.0, stdev: (2.0 / fan_in).sqrt() },
            ConvInit::MsraFanOut => nn::Init::Randn { mean: 0.0, stdev: (2.0 / fan_out).sqrt() },
            ConvInit::XavierFanIn => {
                let bound = (3.0 / fan_in).sqrt();
                nn::Init::Uniform { lo: -bound, up: bound }
            }
            ConvInit::Normal(stdev) => nn::Init::Randn { mean: 0.0, stdev },
        };
        let weight = path.var("weight", &[cout, cin / opts.groups, kernel, kernel], init);
        let bias = opts.bias.then(|| {
            if opts.init == ConvInit::KaimingNormalFanIn {
                let bound = 1.0 / fan_in.sqrt();
                path.var("bias", &[cout], nn::Init::Uniform { lo: -bound, up: bound })
            } else {
                path.zeros("bias", &[cout])
            }
        });
        Conv2d { weight, bias, stride: opts.stride, padding: opts.padding.unwrap_or(kernel / 2), groups: opts.groups }
    }

    /// Applies the convolution.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            self.groups,
        );
        if flops::counting() {
            let w = self.weight.size();
            let o = y.size();
            let per_output = (w[1] * w[2] * w[3]) as u64;
            flops::record_macs(per_output * (o[0] * o[1] * o[2] * o[3]) as u64);
        }
        y
    }
}

/// Convolution (no bias), norm and optionally ReLU: the basic unit of VoVNet and ResNet.
#[derive(Debug)]
pub struct ConvNorm {
    /// The convolution.
    pub conv: Conv2d,
    /// The norm layer after it.
    pub norm: Norm,
    relu: bool,
}

impl ConvNorm {
    /// Creates the unit with its convolution under `path/conv_name` and its norm under `path/norm_name`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: &nn::Path,
        conv_name: &str,
        norm_name: &str,
        cin: i64,
        cout: i64,
        kernel: i64,
        opts: ConvOpts,
        norm: &NormSpec,
        relu: bool,
    ) -> Result<ConvNorm, BackboneError> {
        Ok(ConvNorm {
            conv: Conv2d::new(&path.sub(conv_name), cin, cout, kernel, opts),
            norm: Norm::new(&path.sub(norm_name), cout, norm)?,
            relu,
        })
    }

    /// conv → norm → (ReLU).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.norm.forward_t(&self.conv.forward(x), train);
        if self.relu {
            y.relu()
        } else {
            y
        }
    }
}
