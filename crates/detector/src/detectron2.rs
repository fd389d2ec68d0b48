//! Importing detectron2 checkpoints (e.g. the VoVNet authors' vovnet-detectron2 Mask R-CNN models): our head names
//! map one to one onto detectron2's, whose class layout (background last) is ours too.

/// Our variable name → detectron2's state-dict name for the FPN, RPN and RoI heads; backbone names need the
/// backbone's own mapping and are handled by [`detectron2_name`].
pub fn detectron2_head_name(ours: &str) -> Option<String> {
    let (module, rest) = ours.split_once('.')?;
    match module {
        "fpn" => {
            let (block, param) = rest.split_once('.')?;
            let level = block.strip_prefix("lateral").or_else(|| block.strip_prefix("output"))?;
            let kind = if block.starts_with("lateral") { "lateral" } else { "output" };
            Some(format!("backbone.fpn_{kind}{level}.{param}"))
        }
        "rpn" => Some(format!("proposal_generator.rpn_head.{rest}")),
        "roi_heads" => Some(ours.to_string()),
        _ => None,
    }
}

/// Our variable name → detectron2's, with `backbone_name` mapping backbone-relative names (e.g.
/// `backbone::Backbone::external_name` with `WeightFormat::VovnetDetectron2`); the backbone lives under
/// `backbone.bottom_up.` in detectron2's FPN models.
pub fn detectron2_name(ours: &str, backbone_name: impl Fn(&str) -> Option<String>) -> Option<String> {
    match ours.strip_prefix("backbone.") {
        Some(rest) => backbone_name(rest).map(|n| format!("backbone.bottom_up.{n}")),
        None => detectron2_head_name(ours),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_detectron2() {
        let cases = [
            ("fpn.lateral2.weight", "backbone.fpn_lateral2.weight"),
            ("fpn.output5.norm.bias", "backbone.fpn_output5.norm.bias"),
            ("rpn.conv.weight", "proposal_generator.rpn_head.conv.weight"),
            ("rpn.anchor_deltas.bias", "proposal_generator.rpn_head.anchor_deltas.bias"),
            ("roi_heads.box_head.conv1.norm.weight", "roi_heads.box_head.conv1.norm.weight"),
            ("roi_heads.mask_head.deconv.weight", "roi_heads.mask_head.deconv.weight"),
        ];
        for (ours, theirs) in cases {
            assert_eq!(detectron2_head_name(ours).as_deref(), Some(theirs), "{ours}");
        }
        let backbone = |n: &str| backbone::weights::vovnet_d2_name(n, false);
        assert_eq!(
            detectron2_name("backbone.stage4.1.ese.fc.bias", backbone).as_deref(),
            Some("backbone.bottom_up.stage4.OSA4_2.ese.fc.bias")
        );
        assert_eq!(detectron2_head_name("fpn.top.weight"), None);
    }
}
