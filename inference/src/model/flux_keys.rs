//! Key layouts of the transformer file: BFL (`double_blocks.N.img_attn.qkv.weight`, the
//! layout the model code reads) and diffusers (`transformer_blocks.N.attn.to_q.weight`).
//!
//! Both directions use one table of rules. A BFL tensor is either one diffusers tensor
//! renamed, or several concatenated along the output dimension (fused q/k/v, and q/k/v/mlp
//! in single blocks), or - for the final modulation - one diffusers tensor with its two
//! halves swapped, since diffusers' `AdaLayerNormContinuous` orders (scale, shift) where BFL
//! orders (shift, scale).

use std::ops::Range;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::error::Error;
use crate::model::flux::FluxConfig;
use crate::model::weights::{SafetensorsFiles, TensorMap};

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
        if let Some(missing) = rule.diffusers.iter().find(|k| !map.contains_key(*k)) {
            return Err(Error::InvalidModel(format!(
                "transformer: missing tensor {missing} (part of {})",
                rule.bfl
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

/// One diffusers tensor: rows of a BFL tensor, concatenated.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusersPart {
    pub name: String,
    pub bfl: String,
    pub rows: Vec<Range<usize>>,
}

/// How BFL tensors (name, rows) appear in the diffusers layout. `hidden_size` splits the
/// single blocks' fused q/k/v/mlp projection. A BFL name without a rule is an error naming it.
pub fn diffusers_parts(
    bfl: &[(String, usize)],
    hidden_size: usize,
) -> Result<Vec<DiffusersPart>, Error> {
    let count = |prefix: &str| {
        bfl.iter()
            .filter_map(|(k, _)| {
                k.strip_prefix(prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    };
    let rules = rules(count("double_blocks."), count("single_blocks."));
    let mut parts = Vec::new();
    for (name, rows) in bfl {
        let rule = rules
            .iter()
            .find(|r| &r.bfl == name)
            .ok_or_else(|| Error::InvalidModel(format!("transformer: unknown BFL key {name}")))?;
        if rule.swap_halves {
            let half = rows / 2;
            parts.push(DiffusersPart {
                name: rule.diffusers[0].clone(),
                bfl: name.clone(),
                rows: vec![half..*rows, 0..half],
            });
            continue;
        }
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
        for (diffusers, size) in rule.diffusers.iter().zip(sizes) {
            parts.push(DiffusersPart {
                name: diffusers.clone(),
                bfl: name.clone(),
                rows: std::iter::once(start..start + size).collect(),
            });
            start += size;
        }
    }
    Ok(parts)
}

/// The inverse of [`diffusers_to_bfl`], for writing diffusers-layout test checkpoints.
pub fn bfl_to_diffusers(map: TensorMap, hidden_size: usize) -> Result<TensorMap, Error> {
    let mut bfl: Vec<(String, usize)> = map
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.dim(0)?)))
        .collect::<Result<_, Error>>()?;
    bfl.sort();
    let mut out = TensorMap::new();
    for part in diffusers_parts(&bfl, hidden_size)? {
        let tensor = &map[&part.bfl];
        let rows: Vec<Tensor> = part
            .rows
            .iter()
            .map(|r| tensor.narrow(0, r.start, r.len()))
            .collect::<candle_core::Result<_>>()?;
        out.insert(part.name, Tensor::cat(&rows, 0)?.contiguous()?);
    }
    Ok(out)
}

/// Every BFL tensor a model of `config` reads must be present (the guidance embedder only
/// in guidance-distilled models), and nothing else: an error names the first that is not.
pub fn check_bfl_keys(map: &TensorMap, config: &FluxConfig) -> Result<(), Error> {
    let expected: Vec<String> = rules(config.depth, config.depth_single_blocks)
        .into_iter()
        .map(|r| r.bfl)
        .filter(|k| config.qkv_bias || !k.ends_with(".qkv.bias"))
        .collect();
    let guided = map.keys().any(|k| k.starts_with("guidance_in."));
    if let Some(missing) = expected
        .iter()
        .filter(|k| guided || !k.starts_with("guidance_in."))
        .find(|k| !map.contains_key(*k))
    {
        return Err(Error::InvalidModel(format!(
            "transformer: missing tensor {missing}"
        )));
    }
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    if let Some(unknown) = names.into_iter().find(|k| !expected.contains(k)) {
        return Err(Error::InvalidModel(format!(
            "transformer: unknown tensor {unknown}"
        )));
    }
    Ok(())
}

/// Reads a transformer (one file, shards, or a shard index) in either key layout into BFL
/// names, with linear weights in `linear_dtype` and the small tensors (biases, norm scales)
/// in bf16, and checks its key set against `config`.
pub fn read_transformer(
    paths: &[PathBuf],
    linear_dtype: DType,
    config: &FluxConfig,
    device: &Device,
) -> Result<TensorMap, Error> {
    let files = SafetensorsFiles::open(paths)?;
    let select = transformer_key_selector(&files.names());
    let map = files.read_to(device, select, |name, tensor| {
        match tensor.rank() == 2 && name.ends_with(".weight") {
            true => linear_dtype,
            false => DType::BF16,
        }
    })?;
    let map = match detect_layout(&map)? {
        Layout::Bfl => map,
        Layout::Diffusers => diffusers_to_bfl(map)?,
    };
    check_bfl_keys(&map, config)?;
    Ok(map)
}
