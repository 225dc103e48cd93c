//! Key layouts of the autoencoder: BFL's `ae.safetensors` (`decoder.up.3.block.0.conv1`, the
//! layout the model code reads) and diffusers' `vae/diffusion_pytorch_model.safetensors`
//! (`decoder.up_blocks.0.resnets.0.conv1`), as diffusers' `convert_ldm_vae_checkpoint` maps
//! them: the decoder's levels are numbered in reverse, and the mid-block attention's 1x1
//! convolutions are linear layers (`[c, c]` instead of `[c, c, 1, 1]`).

use candle_core::Tensor;

use crate::error::Error;
use crate::model::weights::TensorMap;

/// `(BFL prefix, diffusers prefix)` of every module of an autoencoder with `levels` levels
/// and `res_blocks` residual blocks per encoder level (one more per decoder level).
fn module_pairs(levels: usize, res_blocks: usize) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut pair = |bfl: String, diffusers: String| pairs.push((bfl, diffusers));
    for side in ["encoder", "decoder"] {
        pair(format!("{side}.conv_in"), format!("{side}.conv_in"));
        pair(format!("{side}.conv_out"), format!("{side}.conv_out"));
        pair(format!("{side}.norm_out"), format!("{side}.conv_norm_out"));
        for (bfl, diffusers) in [("block_1", "resnets.0"), ("block_2", "resnets.1")] {
            resnet_pairs(
                &mut pair,
                &format!("{side}.mid.{bfl}"),
                &format!("{side}.mid_block.{diffusers}"),
            );
        }
        let attn = format!("{side}.mid_block.attentions.0");
        for (bfl, diffusers) in [
            ("norm", "group_norm"),
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("proj_out", "to_out.0"),
        ] {
            pair(
                format!("{side}.mid.attn_1.{bfl}"),
                format!("{attn}.{diffusers}"),
            );
        }
    }
    for level in 0..levels {
        let (bfl, diffusers) = (
            format!("encoder.down.{level}"),
            format!("encoder.down_blocks.{level}"),
        );
        pair(
            format!("{bfl}.downsample.conv"),
            format!("{diffusers}.downsamplers.0.conv"),
        );
        for block in 0..res_blocks {
            resnet_pairs(
                &mut pair,
                &format!("{bfl}.block.{block}"),
                &format!("{diffusers}.resnets.{block}"),
            );
        }
        let (bfl, diffusers) = (
            format!("decoder.up.{level}"),
            format!("decoder.up_blocks.{}", levels - 1 - level),
        );
        pair(
            format!("{bfl}.upsample.conv"),
            format!("{diffusers}.upsamplers.0.conv"),
        );
        for block in 0..=res_blocks {
            resnet_pairs(
                &mut pair,
                &format!("{bfl}.block.{block}"),
                &format!("{diffusers}.resnets.{block}"),
            );
        }
    }
    pairs
}

fn resnet_pairs(pair: &mut impl FnMut(String, String), bfl: &str, diffusers: &str) {
    for (b, d) in [
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
        ("nin_shortcut", "conv_shortcut"),
    ] {
        pair(format!("{bfl}.{b}"), format!("{diffusers}.{d}"));
    }
}

/// Levels and encoder residual blocks per level, counted from BFL or diffusers keys.
fn dimensions<'a>(names: impl Iterator<Item = &'a String> + Clone) -> (usize, usize) {
    let max_after = |prefix: &str, index: usize| {
        names
            .clone()
            .filter_map(|n| {
                n.strip_prefix(prefix)?
                    .split('.')
                    .nth(index)?
                    .parse::<usize>()
                    .ok()
            })
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    };
    let levels = max_after("encoder.down.", 0).max(max_after("encoder.down_blocks.", 0));
    let levels = levels
        .max(max_after("decoder.up.", 0))
        .max(max_after("decoder.up_blocks.", 0));
    let blocks = max_after("encoder.down.", 2).max(max_after("encoder.down_blocks.", 2));
    // Without the encoder (a decoder-only read) the decoder's blocks are one more.
    let blocks = match blocks {
        0 => max_after("decoder.up.", 2)
            .max(max_after("decoder.up_blocks.", 2))
            .saturating_sub(1),
        n => n,
    };
    (levels, blocks)
}

/// Whether the map's keys are diffusers' (`*.up_blocks.*`, `*.down_blocks.*`, `*.mid_block.*`).
pub fn is_diffusers<'a>(mut names: impl Iterator<Item = &'a String>) -> bool {
    names.any(|n| n.contains("_blocks.") || n.contains(".mid_block."))
}

/// Whether a BFL tensor is one of the attention's 1x1 convolution weights.
fn is_attention_conv(bfl_name: &str) -> bool {
    ["q", "k", "v", "proj_out"]
        .iter()
        .any(|p| bfl_name.ends_with(&format!(".mid.attn_1.{p}.weight")))
}

fn rename(name: &str, pairs: &[(String, String)], from_bfl: bool) -> Option<String> {
    let (module, leaf) = name.rsplit_once('.')?;
    pairs.iter().find_map(|(bfl, diffusers)| {
        let (from, to) = match from_bfl {
            true => (bfl, diffusers),
            false => (diffusers, bfl),
        };
        (from == module).then(|| format!("{to}.{leaf}"))
    })
}

/// The diffusers name and shape of a BFL autoencoder tensor.
pub fn bfl_to_diffusers_name(
    name: &str,
    shape: &[usize],
    levels: usize,
    res_blocks: usize,
) -> Result<(String, Vec<usize>), Error> {
    let renamed = rename(name, &module_pairs(levels, res_blocks), true)
        .ok_or_else(|| Error::InvalidModel(format!("vae: unknown BFL key {name}")))?;
    let shape = match is_attention_conv(name) {
        true => shape[..2].to_vec(),
        false => shape.to_vec(),
    };
    Ok((renamed, shape))
}

/// The map in BFL keys, whichever layout it was read in.
pub fn to_bfl(map: TensorMap) -> Result<TensorMap, Error> {
    match is_diffusers(map.keys()) {
        true => diffusers_to_bfl(map),
        false => Ok(map),
    }
}

/// Renames diffusers autoencoder keys to BFL keys, reshaping the attention weights to 1x1
/// convolutions. A key that maps to nothing is an error naming it.
pub fn diffusers_to_bfl(map: TensorMap) -> Result<TensorMap, Error> {
    let (levels, res_blocks) = dimensions(map.keys());
    let pairs = module_pairs(levels, res_blocks);
    let mut out = TensorMap::new();
    let mut names: Vec<String> = map.keys().cloned().collect();
    names.sort();
    let mut map = map;
    for name in names {
        let bfl = rename(&name, &pairs, false)
            .ok_or_else(|| Error::InvalidModel(format!("vae: unknown diffusers key {name}")))?;
        let tensor: Tensor = map.remove(&name).expect("listed key");
        let tensor = match is_attention_conv(&bfl) && tensor.rank() == 2 {
            true => tensor.unsqueeze(2)?.unsqueeze(3)?,
            false => tensor,
        };
        out.insert(bfl, tensor);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_levels_are_reversed_and_attention_is_linear() {
        let (name, shape) = bfl_to_diffusers_name(
            "decoder.up.3.block.2.nin_shortcut.weight",
            &[4, 8, 1, 1],
            4,
            2,
        )
        .unwrap();
        assert_eq!(name, "decoder.up_blocks.0.resnets.2.conv_shortcut.weight");
        assert_eq!(shape, vec![4, 8, 1, 1]);
        let (name, shape) =
            bfl_to_diffusers_name("encoder.mid.attn_1.proj_out.weight", &[8, 8, 1, 1], 4, 2)
                .unwrap();
        assert_eq!(name, "encoder.mid_block.attentions.0.to_out.0.weight");
        assert_eq!(shape, vec![8, 8]);
        let err = bfl_to_diffusers_name("decoder.up.3.block.9.conv1.weight", &[1], 4, 2);
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("decoder.up.3.block.9.conv1.weight")
        );
    }
}
