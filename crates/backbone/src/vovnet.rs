//! VoVNet V1 and V2 (Lee et al. 2019; Lee & Park 2020) with the layer order of the authors' detectron2 code:
//! a stride-4 stem, then four stages of One-Shot Aggregation (OSA) modules, each stage after the first opening with
//! a 3x3 stride-2 max-pool in `ceil_mode`.

use tch::{nn, Tensor};

use crate::layers::{Conv2d, ConvNorm, ConvOpts};
use crate::norm::{Norm, NormSpec};
use crate::{BackboneError, FeatureSpec};

/// Widths and depths of one VoVNet variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoVNetSpec {
    /// Variant name as written in configs, e.g. `V-57`.
    pub name: &'static str,
    /// Output channels of the three stem convolutions.
    pub stem: [i64; 3],
    /// Width of the 3x3 convolutions inside the OSA modules of stages 2..5.
    pub stage_channels: [i64; 4],
    /// Output width (after the 1x1 aggregation) of stages 2..5.
    pub concat_channels: [i64; 4],
    /// 3x3 convolutions per OSA module.
    pub layers_per_module: i64,
    /// OSA modules per stage, stages 2..5.
    pub modules_per_stage: [i64; 4],
    /// Depthwise-separable convolutions (the `-dw` variants).
    pub depthwise: bool,
}

const WIDE: [i64; 4] = [128, 160, 192, 224];
const WIDE_OUT: [i64; 4] = [256, 512, 768, 1024];
const SLIM: [i64; 4] = [64, 80, 96, 112];

/// Every VoVNet variant of `shared/notes/vovnet.md`.
pub const VOVNET_SPECS: [VoVNetSpec; 8] = [
    VoVNetSpec {
        name: "V-19-slim-dw",
        stem: [64, 64, 64],
        stage_channels: SLIM,
        concat_channels: [112, 256, 384, 512],
        layers_per_module: 3,
        modules_per_stage: [1, 1, 1, 1],
        depthwise: true,
    },
    VoVNetSpec {
        name: "V-19-dw",
        stem: [64, 64, 64],
        stage_channels: WIDE,
        concat_channels: WIDE_OUT,
        layers_per_module: 3,
        modules_per_stage: [1, 1, 1, 1],
        depthwise: true,
    },
    VoVNetSpec {
        name: "V-19-slim",
        stem: [64, 64, 128],
        stage_channels: SLIM,
        concat_channels: [112, 256, 384, 512],
        layers_per_module: 3,
        modules_per_stage: [1, 1, 1, 1],
        depthwise: false,
    },
    VoVNetSpec {
        name: "V-19",
        stem: [64, 64, 128],
        stage_channels: WIDE,
        concat_channels: WIDE_OUT,
        layers_per_module: 3,
        modules_per_stage: [1, 1, 1, 1],
        depthwise: false,
    },
    VoVNetSpec {
        name: "V-27-slim",
        stem: [64, 64, 128],
        stage_channels: SLIM,
        concat_channels: [128, 256, 384, 512],
        layers_per_module: 5,
        modules_per_stage: [1, 1, 1, 1],
        depthwise: false,
    },
    VoVNetSpec {
        name: "V-39",
        stem: [64, 64, 128],
        stage_channels: WIDE,
        concat_channels: WIDE_OUT,
        layers_per_module: 5,
        modules_per_stage: [1, 1, 2, 2],
        depthwise: false,
    },
    VoVNetSpec {
        name: "V-57",
        stem: [64, 64, 128],
        stage_channels: WIDE,
        concat_channels: WIDE_OUT,
        layers_per_module: 5,
        modules_per_stage: [1, 1, 4, 3],
        depthwise: false,
    },
    VoVNetSpec {
        name: "V-99",
        stem: [64, 64, 128],
        stage_channels: WIDE,
        concat_channels: WIDE_OUT,
        layers_per_module: 5,
        modules_per_stage: [1, 3, 9, 3],
        depthwise: false,
    },
];

/// Looks a variant up by its config name.
pub fn vovnet_spec(name: &str) -> Option<&'static VoVNetSpec> {
    VOVNET_SPECS.iter().find(|s| s.name == name)
}

/// A 3x3 unit: a plain conv unit, or (depthwise variants) depthwise 3x3 → pointwise 1x1 → norm → ReLU.
#[derive(Debug)]
enum Unit {
    Plain(ConvNorm),
    Depthwise { dw: Conv2d, pw: Conv2d, norm: Norm },
}

impl Unit {
    fn new(
        path: &nn::Path,
        cin: i64,
        cout: i64,
        stride: i64,
        depthwise: bool,
        norm: &NormSpec,
    ) -> Result<Unit, BackboneError> {
        if depthwise {
            let dw_opts = ConvOpts { stride, groups: cin, ..Default::default() };
            Ok(Unit::Depthwise {
                dw: Conv2d::new(&path.sub("dw"), cin, cin, 3, dw_opts),
                pw: Conv2d::new(&path.sub("pw"), cin, cout, 1, ConvOpts::default()),
                norm: Norm::new(&path.sub("norm"), cout, norm)?,
            })
        } else {
            let opts = ConvOpts { stride, ..Default::default() };
            Ok(Unit::Plain(ConvNorm::new(path, "conv", "norm", cin, cout, 3, opts, norm, true)?))
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Unit::Plain(unit) => unit.forward_t(x, train),
            Unit::Depthwise { dw, pw, norm } => norm.forward_t(&pw.forward(&dw.forward(x)), train).relu(),
        }
    }
}

/// Effective Squeeze-Excitation (VoVNetV2): global average pool, a 1x1 conv without reduction, hard sigmoid.
#[derive(Debug)]
struct Ese {
    fc: Conv2d,
}

impl Ese {
    fn forward(&self, x: &Tensor) -> Tensor {
        let pooled = x.mean_dim(&[2i64, 3][..], true, x.kind());
        x * self.fc.forward(&pooled).hardsigmoid()
    }
}

/// One-Shot Aggregation module: L 3x3 units in sequence, one concatenation of the input and every output, a 1x1
/// aggregation unit, then eSE and the identity shortcut when enabled.
#[derive(Debug)]
struct OsaModule {
    reduce: Option<ConvNorm>,
    layers: Vec<Unit>,
    concat: ConvNorm,
    ese: Option<Ese>,
    identity: bool,
}

/// Options that distinguish VoVNetV2 from V1.
#[derive(Debug, Clone, Copy)]
struct OsaOpts {
    depthwise: bool,
    ese: bool,
    identity: bool,
}

impl OsaModule {
    fn new(
        path: &nn::Path,
        cin: i64,
        stage_ch: i64,
        concat_ch: i64,
        layers: i64,
        opts: OsaOpts,
        norm: &NormSpec,
    ) -> Result<OsaModule, BackboneError> {
        let reduce = if opts.depthwise && cin != stage_ch {
            Some(ConvNorm::new(&path.sub("reduce"), "conv", "norm", cin, stage_ch, 1, ConvOpts::default(), norm, true)?)
        } else {
            None
        };
        let mut units = Vec::new();
        let mut width = if reduce.is_some() { stage_ch } else { cin };
        for i in 0..layers {
            units.push(Unit::new(&path.sub("layers").sub(i), width, stage_ch, 1, opts.depthwise, norm)?);
            width = stage_ch;
        }
        let concat_in = cin + layers * stage_ch;
        let concat = ConvNorm::new(
            &path.sub("concat"),
            "conv",
            "norm",
            concat_in,
            concat_ch,
            1,
            ConvOpts::default(),
            norm,
            true,
        )?;
        let ese = opts.ese.then(|| Ese {
            fc: Conv2d::new(
                &path.sub("ese").sub("fc"),
                concat_ch,
                concat_ch,
                1,
                ConvOpts { bias: true, ..Default::default() },
            ),
        });
        Ok(OsaModule { reduce, layers: units, concat, ese, identity: opts.identity })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut outputs = vec![x.shallow_clone()];
        let mut y = match &self.reduce {
            Some(reduce) => reduce.forward_t(x, train),
            None => x.shallow_clone(),
        };
        for layer in &self.layers {
            y = layer.forward_t(&y, train);
            outputs.push(y.shallow_clone());
        }
        let mut y = self.concat.forward_t(&Tensor::cat(&outputs, 1), train);
        if let Some(ese) = &self.ese {
            y = ese.forward(&y);
        }
        if self.identity {
            y + x
        } else {
            y
        }
    }
}

/// VoVNet: stem and stages 2..5, exposing `stem` and `stage2..stage5`.
#[derive(Debug)]
pub struct VoVNet {
    stem: Vec<Unit>,
    stages: Vec<Vec<OsaModule>>,
    specs: Vec<FeatureSpec>,
}

impl VoVNet {
    /// Builds `spec` under `path` (variables `stem.*`, `stage2.*` .. `stage5.*`). `ese` puts eSE in every OSA
    /// module and `identity` adds the identity shortcut to modules 2..N of each stage (both on for V2).
    pub fn new(
        path: &nn::Path,
        spec: &VoVNetSpec,
        ese: bool,
        identity: bool,
        norm: &NormSpec,
    ) -> Result<VoVNet, BackboneError> {
        let stem_path = path.sub("stem");
        let stem = vec![
            Unit::new(&stem_path.sub(1), 3, spec.stem[0], 2, false, norm)?,
            Unit::new(&stem_path.sub(2), spec.stem[0], spec.stem[1], 1, spec.depthwise, norm)?,
            Unit::new(&stem_path.sub(3), spec.stem[1], spec.stem[2], 2, spec.depthwise, norm)?,
        ];
        let mut specs = vec![FeatureSpec { name: "stem".into(), stride: 4, channels: spec.stem[2] }];
        let mut stages = Vec::new();
        let mut cin = spec.stem[2];
        for (i, &count) in spec.modules_per_stage.iter().enumerate() {
            let stage_path = path.sub(format!("stage{}", i + 2));
            let mut modules = Vec::new();
            for m in 0..count {
                let opts = OsaOpts { depthwise: spec.depthwise, ese, identity: identity && m > 0 };
                modules.push(OsaModule::new(
                    &stage_path.sub(m),
                    cin,
                    spec.stage_channels[i],
                    spec.concat_channels[i],
                    spec.layers_per_module,
                    opts,
                    norm,
                )?);
                cin = spec.concat_channels[i];
            }
            stages.push(modules);
            specs.push(FeatureSpec { name: format!("stage{}", i + 2), stride: 4 << i, channels: cin });
        }
        Ok(VoVNet { stem, stages, specs })
    }

    /// Output names, strides and widths: `stem`, `stage2`..`stage5`.
    pub fn feature_specs(&self) -> &[FeatureSpec] {
        &self.specs
    }

    /// Runs the network and returns every named output in [`Self::feature_specs`] order.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut y = x.shallow_clone();
        for unit in &self.stem {
            y = unit.forward_t(&y, train);
        }
        let mut outputs = vec![y.shallow_clone()];
        for (i, modules) in self.stages.iter().enumerate() {
            if i > 0 {
                y = y.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], true);
            }
            for module in modules {
                y = module.forward_t(&y, train);
            }
            outputs.push(y.shallow_clone());
        }
        outputs
    }
}
