//! Key layouts of the transformer file: BFL (`double_blocks.N.img_attn.qkv.weight`, the
//! layout the model code reads) and diffusers (`transformer_blocks.N.attn.to_q.weight`).
//!
//! Both directions use one table of rules. A BFL tensor is either one diffusers tensor
//! renamed, or several concatenated along the output dimension (fused q/k/v, and q/k/v/mlp
//! in single blocks), or - for the final modulation - one diffusers tensor with its two
//! halves swapped, since diffusers' `AdaLayerNormContinuous` orders (scale, shift) where BFL
//! orders (shift, scale).

use candle_core::Tensor;

use crate::error::Error;
use crate::model::weights::TensorMap;

/// Prefix of the transformer in ComfyUI-style checkpoints that bundle other components.
const BUNDLED_PREFIX: &str = "model.diffusion_model.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Bfl,
    Diffusers,
}

/// Which keys of a file are the transformer's, and under which name: when any key has the
/// bundled prefix, only those keys (prefix stripped); otherwise all keys.
pub fn transformer_key_selector(names: &[String]) -> impl Fn(&str) -> Option<String> + use<> {
    let bundled = names.iter().any(|n| n.starts_with(BUNDLED_PREFIX));
    move |name: &str| match bundled {
        true => name.strip_prefix(BUNDLED_PREFIX).map(str::to_string),
        false => Some(name.to_string()),
    }
}

pub fn detect_layout(map: &TensorMap) -> Result<Layout, Error> {
    if map.contains_key("img_in.weight") {
        Ok(Layout::Bfl)
    } else if map.contains_key("x_embedder.weight") {
        Ok(Layout::Diffusers)
    } else {
        Err(Error::InvalidModel(
            "transformer: neither BFL (img_in.weight) nor diffusers (x_embedder.weight) keys"
                .into(),
        ))
    }
}

#[derive(Debug)]
struct Rule {
    bfl: String,
    diffusers: Vec<String>,
    swap_halves: bool,
}

fn rules(double_blocks: usize, single_blocks: usize) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut push = |bfl: String, diffusers: Vec<String>, swap_halves: bool| {
        for suffix in ["weight", "bias"] {
            rules.push(Rule {
                bfl: format!("{bfl}.{suffix}"),
                diffusers: diffusers.iter().map(|d| format!("{d}.{suffix}")).collect(),
                swap_halves,
            });
        }
    };
    let mut linear = |bfl: &str, diffusers: &str| push(bfl.into(), vec![diffusers.into()], false);
    linear("img_in", "x_embedder");
    linear("txt_in", "context_embedder");
    linear(
        "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_1",
    );
    linear(
        "time_in.out_layer",
        "time_text_embed.timestep_embedder.linear_2",
    );
    linear(
        "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_1",
    );
    linear(
        "guidance_in.out_layer",
        "time_text_embed.guidance_embedder.linear_2",
    );
    linear(
        "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_1",
    );
    linear(
        "vector_in.out_layer",
        "time_text_embed.text_embedder.linear_2",
    );
    linear("final_layer.linear", "proj_out");
    for i in 0..double_blocks {
        let (b, d) = (
            format!("double_blocks.{i}"),
            format!("transformer_blocks.{i}"),
        );
        let mut linear = |bfl: &str, diffusers: &str| {
            push(
                format!("{b}.{bfl}"),
                vec![format!("{d}.{diffusers}")],
                false,
            )
        };
        linear("img_mod.lin", "norm1.linear");
        linear("txt_mod.lin", "norm1_context.linear");
        linear("img_attn.proj", "attn.to_out.0");
        linear("txt_attn.proj", "attn.to_add_out");
        linear("img_mlp.0", "ff.net.0.proj");
        linear("img_mlp.2", "ff.net.2");
        linear("txt_mlp.0", "ff_context.net.0.proj");
        linear("txt_mlp.2", "ff_context.net.2");
        let fused = |parts: [&str; 3]| parts.iter().map(|p| format!("{d}.attn.{p}")).collect();
        push(
            format!("{b}.img_attn.qkv"),
            fused(["to_q", "to_k", "to_v"]),
            false,
        );
        push(
            format!("{b}.txt_attn.qkv"),
            fused(["add_q_proj", "add_k_proj", "add_v_proj"]),
            false,
        );
    }
    for i in 0..single_blocks {
        let (b, d) = (
            format!("single_blocks.{i}"),
            format!("single_transformer_blocks.{i}"),
        );
        push(
            format!("{b}.modulation.lin"),
            vec![format!("{d}.norm.linear")],
            false,
        );
        push(format!("{b}.linear2"), vec![format!("{d}.proj_out")], false);
        let parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"];
        push(
            format!("{b}.linear1"),
            parts.iter().map(|p| format!("{d}.{p}")).collect(),
            false,
        );
    }
    push(
        "final_layer.adaLN_modulation.1".into(),
        vec!["norm_out.linear".into()],
        true,
    );
    // RMSNorm scales have no bias and are named differently on each side.
    let mut scale = |bfl: String, diffusers: String| {
        rules.push(Rule {
            bfl: format!("{bfl}.scale"),
            diffusers: vec![format!("{diffusers}.weight")],
            swap_halves: false,
        })
    };
    for i in 0..double_blocks {
        let (b, d) = (
            format!("double_blocks.{i}"),
            format!("transformer_blocks.{i}.attn"),
        );
        scale(
            format!("{b}.img_attn.norm.query_norm"),
            format!("{d}.norm_q"),
        );
        scale(format!("{b}.img_attn.norm.key_norm"), format!("{d}.norm_k"));
        scale(
            format!("{b}.txt_attn.norm.query_norm"),
            format!("{d}.norm_added_q"),
        );
        scale(
            format!("{b}.txt_attn.norm.key_norm"),
            format!("{d}.norm_added_k"),
        );
    }
    for i in 0..single_blocks {
        let (b, d) = (
            format!("single_blocks.{i}"),
            format!("single_transformer_blocks.{i}.attn"),
        );
        scale(format!("{b}.norm.query_norm"), format!("{d}.norm_q"));
        scale(format!("{b}.norm.key_norm"), format!("{d}.norm_k"));
    }
    rules
}

/// Number of blocks `prefix.N.` in a map's keys.
fn count_blocks(map: &TensorMap, prefix: &str) -> usize {
    map.keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

fn swap_halves(t: &Tensor) -> candle_core::Result<Tensor> {
    let half = t.dim(0)? / 2;
    Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
}

/// Renames diffusers keys to BFL keys, fusing q/k/v. Every input key must be consumed.
pub fn diffusers_to_bfl(mut map: TensorMap) -> Result<TensorMap, Error> {
    let double_blocks = count_blocks(&map, "transformer_blocks.");
    let single_blocks = count_blocks(&map, "single_transformer_blocks.");
    let mut out = TensorMap::new();
    for rule in rules(double_blocks, single_blocks) {
        let present = rule
            .diffusers
            .iter()
            .filter(|k| map.contains_key(*k))
            .count();
        if present == 0 {
            continue; // e.g. no guidance embedder in schnell
        }
        if present < rule.diffusers.len() {
            return Err(Error::InvalidModel(format!(
                "transformer: {} needs all of {:?}",
                rule.bfl, rule.diffusers
            )));
        }
        let parts: Vec<Tensor> = rule
            .diffusers
            .iter()
            .filter_map(|k| map.remove(k))
            .collect();
        let tensor = Tensor::cat(&parts, 0)?;
        let tensor = match rule.swap_halves {
            true => swap_halves(&tensor)?,
            false => tensor,
        };
        out.insert(rule.bfl, tensor);
    }
    if let Some(unknown) = map.keys().min() {
        return Err(Error::InvalidModel(format!(
            "transformer: unknown diffusers key {unknown} ({} unconverted)",
            map.len()
        )));
    }
    Ok(out)
}

/// The inverse of [`diffusers_to_bfl`], for writing diffusers-layout test checkpoints.
/// `hidden_size` splits the single blocks' fused q/k/v/mlp projection.
pub fn bfl_to_diffusers(mut map: TensorMap, hidden_size: usize) -> Result<TensorMap, Error> {
    let double_blocks = count_blocks(&map, "double_blocks.");
    let single_blocks = count_blocks(&map, "single_blocks.");
    let mut out = TensorMap::new();
    for rule in rules(double_blocks, single_blocks) {
        let Some(tensor) = map.remove(&rule.bfl) else {
            continue;
        };
        let tensor = match rule.swap_halves {
            true => swap_halves(&tensor)?,
            false => tensor,
        };
        let rows = tensor.dim(0)?;
        let sizes = match rule.diffusers.len() {
            4 => vec![
                hidden_size,
                hidden_size,
                hidden_size,
                rows - 3 * hidden_size,
            ],
            n => vec![rows / n; n],
        };
        let mut start = 0;
        for (name, size) in rule.diffusers.into_iter().zip(sizes) {
            out.insert(name, tensor.narrow(0, start, size)?.contiguous()?);
            start += size;
        }
    }
    if let Some(unknown) = map.keys().min() {
        return Err(Error::InvalidModel(format!(
            "transformer: unknown BFL key {unknown}"
        )));
    }
    Ok(out)
}
