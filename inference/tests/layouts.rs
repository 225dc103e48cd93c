//! Every published checkpoint layout loads, each checked on tiny random weights against the
//! BFL single-file load of the same weights: diffusers' sharded transformer with its index,
//! diffusers' `vae/`, ComfyUI's scaled fp8, and T5's tokenizer as `spiece.model` alone; and a
//! missing or unknown tensor is an error naming it.

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use atelier_inference::model::flux_keys::{self, Layout};
use atelier_inference::model::manifest::Manifest;
use atelier_inference::model::vae_keys;
use atelier_inference::model::weights::{SafetensorsFiles, TensorMap};
use atelier_inference::pipeline::{GenerateRequest, Pipeline, Precision};
use atelier_inference::tiny::{DIFFUSERS_VAE, T5_SPIECE, TinyModelOptions, make_tiny_model};
use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use tempfile::TempDir;

const SEED: u64 = 11;

fn model(options: TinyModelOptions) -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), SEED, &options).expect("tiny model");
    dir
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let mut manifest = Manifest::read(dir).expect("manifest");
    edit(&mut manifest);
    manifest.write(dir).expect("write manifest");
}

fn manifest(dir: &Path) -> Manifest {
    Manifest::read(dir).expect("manifest")
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of a red cat".into(),
        width: 64,
        height: 64,
        steps: 2,
        guidance: 3.5,
        seed: 5,
        num_images: 1,
    }
}

/// Final latents of one short generation.
fn latents(dir: &Path) -> Tensor {
    let pipeline = Pipeline::load(dir, Precision::Bf16).expect("load");
    let req = request();
    let conditioning = pipeline.encode_prompt(&req.prompt).expect("encode");
    let noise = pipeline.initial_noise(&req).expect("noise");
    let sigmas = pipeline.sigmas(&req);
    pipeline
        .denoise(&conditioning, &noise, &sigmas, req.guidance, &mut |_, _| {
            ControlFlow::Continue(())
        })
        .expect("denoise")
        .to_dtype(DType::F32)
        .expect("f32")
}

fn transformer(dir: &Path, weights: &str) -> TensorMap {
    flux_keys::read_transformer(
        &[dir.join(weights)],
        DType::F32,
        &manifest(dir).transformer.config,
        &Device::Cpu,
    )
    .expect("read transformer")
}

fn assert_same_tensors(a: &TensorMap, b: &TensorMap, what: &str) {
    let mut keys: Vec<&String> = a.keys().collect();
    keys.sort();
    let mut other: Vec<&String> = b.keys().collect();
    other.sort();
    assert_eq!(keys, other, "{what}: key sets differ");
    for key in keys {
        let (x, y) = (&a[key], &b[key]);
        assert_eq!(x.dims(), y.dims(), "{what}: {key} shape");
        assert_eq!(max_abs_diff(x, y), 0.0, "{what}: {key} differs");
    }
}

fn error_of(result: Result<Pipeline, atelier_inference::pipeline::Error>) -> String {
    match result {
        Ok(_) => panic!("the model loaded"),
        Err(e) => e.to_string(),
    }
}

/// A transformer of a few hundred kB in shards of 200 kB, as diffusers shards at 10 GB.
fn sharded() -> TempDir {
    model(TinyModelOptions {
        diffusers_copy: true,
        transformer_shard_bytes: 200_000,
        ..TinyModelOptions::tiny()
    })
}

const TRANSFORMER_INDEX: &str = "transformer/diffusion_pytorch_model.safetensors.index.json";

#[test]
fn diffusers_sharded_transformer_equals_the_bfl_file() {
    let dir = sharded();
    let shards = std::fs::read_dir(dir.path().join("transformer"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("diffusion_pytorch_model-") && name.ends_with(".safetensors")
        })
        .count();
    assert!(shards >= 3, "{shards} shards");
    let bfl = transformer(dir.path(), "flux1-tiny.safetensors");
    assert_same_tensors(
        &bfl,
        &transformer(dir.path(), TRANSFORMER_INDEX),
        "diffusers",
    );

    let reference = latents(dir.path());
    edit_manifest(dir.path(), |m| {
        m.transformer.weights = TRANSFORMER_INDEX.into()
    });
    assert_eq!(max_abs_diff(&latents(dir.path()), &reference), 0.0);
}

#[test]
fn a_diffusers_only_directory_loads() {
    let dir = model(TinyModelOptions {
        layout: Layout::Diffusers,
        ..TinyModelOptions::tiny()
    });
    assert!(!dir.path().join("flux1-tiny.safetensors").exists());
    for file in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "vae/config.json",
    ] {
        assert!(dir.path().join(file).is_file(), "{file}");
    }
    assert_eq!(manifest(dir.path()).vae.weights, DIFFUSERS_VAE);
    let pipeline = Pipeline::load(dir.path(), Precision::Bf16).unwrap();
    let images = pipeline.generate(&request(), &mut |_, _| ControlFlow::Continue(()));
    assert_eq!(images.unwrap().len(), 1);
}

#[test]
fn diffusers_vae_equals_ae_safetensors_in_bf16() {
    let dir = sharded();
    let read = |file: &str| {
        SafetensorsFiles::open(&[dir.path().join(file)])
            .unwrap()
            .read(|n| Some(n.to_string()), |_, _| DType::F32)
            .unwrap()
    };
    let ae = read("ae.safetensors");
    // diffusers publishes the autoencoder in bf16, BFL in f32.
    let ae_bf16: TensorMap = ae
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::BF16).unwrap()))
        .collect();
    let raw = read(DIFFUSERS_VAE);
    // diffusers numbers the decoder's levels from the bottom: its first up block is BFL's
    // last level, the one with an upsampler; the mid-block attention is linear.
    assert!(raw.contains_key("decoder.up_blocks.0.upsamplers.0.conv.weight"));
    assert!(!raw.contains_key("decoder.up_blocks.3.upsamplers.0.conv.weight"));
    assert_eq!(raw["decoder.mid_block.attentions.0.to_q.weight"].rank(), 2);
    let diffusers = vae_keys::to_bfl(raw).unwrap();
    assert_same_tensors(&ae_bf16, &diffusers, "vae");
}

/// The BFL transformer of a scaled-fp8 file as the test computes it from the raw file:
/// each `X.weight` times its `X.scale_weight`, in f32; scales and marker dropped.
fn dequantized_by_hand(path: &Path) -> HashMap<String, Tensor> {
    let raw = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    assert!(raw.contains_key("scaled_fp8"));
    let mut out = HashMap::new();
    for (name, tensor) in &raw {
        if name.ends_with(".scale_weight") || name.ends_with(".scale_input") || name == "scaled_fp8"
        {
            continue;
        }
        let scale = name
            .strip_suffix(".weight")
            .and_then(|m| raw.get(&format!("{m}.scale_weight")));
        let value = tensor.to_dtype(DType::F32).unwrap();
        let value = match scale {
            Some(scale) => {
                assert_eq!(tensor.dtype(), DType::F8E4M3, "{name}");
                let scale = scale
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                (value * f64::from(scale)).unwrap()
            }
            None => value,
        };
        out.insert(name.clone(), value);
    }
    out
}

#[test]
fn scaled_fp8_weights_are_multiplied_by_their_scale() {
    let dir = model(TinyModelOptions {
        transformer_dtype: DType::F8E4M3,
        scaled_fp8: true,
        ..TinyModelOptions::tiny()
    });
    let expected = dequantized_by_hand(&dir.path().join("flux1-tiny.safetensors"));
    let loaded = transformer(dir.path(), "flux1-tiny.safetensors");
    assert_same_tensors(&expected, &loaded, "scaled fp8");

    // The power-of-two scales make the products exact in bf16: a bf16 BFL file of them must
    // generate the same latents.
    let scaled = latents(dir.path());
    let bf16: HashMap<String, Tensor> = expected
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&bf16, dir.path().join("widened.safetensors")).unwrap();
    edit_manifest(dir.path(), |m| {
        m.transformer.weights = "widened.safetensors".into()
    });
    let widened = latents(dir.path());
    assert_eq!(max_abs_diff(&scaled, &widened), 0.0);
}

#[test]
fn a_scale_that_cannot_be_applied_exactly_is_refused_by_name() {
    let dir = model(TinyModelOptions {
        transformer_dtype: DType::F8E4M3,
        scaled_fp8: true,
        ..TinyModelOptions::tiny()
    });
    let path = dir.path().join("flux1-tiny.safetensors");
    let mut raw = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let key = "double_blocks.1.img_mlp.0.scale_weight";
    let per_channel = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    assert!(raw.insert(key.into(), per_channel).is_some());
    candle_core::safetensors::save(&raw, &path).unwrap();
    let error = error_of(Pipeline::load(dir.path(), Precision::Bf16));
    assert!(error.contains(key), "{error}");
}

#[test]
fn t5_tokenizer_from_spiece_model_alone_gives_the_same_ids() {
    let dir = model(TinyModelOptions::tiny());
    let prompts = [
        "a photo of a red cat",
        "  The   CITY at night, 42 dogs!  ",
        "portrait of a woman with green light",
        "naïve Ünïcode façade",
    ];
    let ids = |dir: &Path| {
        let pipeline = Pipeline::load(dir, Precision::Bf16).unwrap();
        prompts
            .iter()
            .map(|p| pipeline.token_ids(p).unwrap().0)
            .collect::<Vec<_>>()
    };
    let from_json = ids(dir.path());
    std::fs::remove_file(dir.path().join("tokenizer_2/tokenizer.json")).unwrap();
    edit_manifest(dir.path(), |m| m.t5.tokenizer = T5_SPIECE.into());
    assert_eq!(ids(dir.path()), from_json);
    // A truncated model is an error naming the file.
    let spiece = dir.path().join(T5_SPIECE);
    let bytes = std::fs::read(&spiece).unwrap();
    std::fs::write(&spiece, &bytes[..bytes.len() - 5]).unwrap();
    let error = error_of(Pipeline::load(dir.path(), Precision::Bf16));
    assert!(error.contains("spiece.model"), "{error}");
}

/// Rewrites one safetensors file with `edit` applied to its tensors.
fn edit_file(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn missing_and_unknown_transformer_tensors_are_named() {
    let dir = model(TinyModelOptions::tiny());
    let path = dir.path().join("flux1-tiny.safetensors");
    let missing = "double_blocks.1.img_mlp.0.bias";
    edit_file(&path, |t| assert!(t.remove(missing).is_some()));
    let error = error_of(Pipeline::load(dir.path(), Precision::Bf16));
    assert!(error.contains(missing), "{error}");

    let dir = model(TinyModelOptions::tiny());
    let path = dir.path().join("flux1-tiny.safetensors");
    let unknown = "double_blocks.0.img_attn.extra.weight";
    edit_file(&path, |t| {
        t.insert(
            unknown.into(),
            Tensor::zeros((2, 2), DType::BF16, &Device::Cpu).unwrap(),
        );
    });
    let error = error_of(Pipeline::load(dir.path(), Precision::Bf16));
    assert!(error.contains(unknown), "{error}");
}

#[test]
fn shard_indexes_and_diffusers_keys_that_do_not_match_are_named() {
    let dir = sharded();
    edit_manifest(dir.path(), |m| {
        m.transformer.weights = TRANSFORMER_INDEX.into()
    });
    let index_path = dir.path().join(TRANSFORMER_INDEX);
    let original = std::fs::read_to_string(&index_path).unwrap();
    let mut index: serde_json::Value = serde_json::from_str(&original).unwrap();
    let shard = index["weight_map"]["proj_out.weight"].clone();
    index["weight_map"]["transformer_blocks.7.attn.to_q.weight"] = shard;
    std::fs::write(&index_path, index.to_string()).unwrap();
    let error = error_of(Pipeline::load(dir.path(), Precision::Bf16));
    assert!(
        error.contains("transformer_blocks.7.attn.to_q.weight"),
        "{error}"
    );

    // A shard without one of the fused parts.
    std::fs::write(&index_path, &original).unwrap();
    let index: serde_json::Value = serde_json::from_str(&original).unwrap();
    let key = "single_transformer_blocks.1.proj_mlp.weight";
    let shard = index["weight_map"][key].as_str().unwrap().to_string();
    let mut index = index;
    index["weight_map"].as_object_mut().unwrap().remove(key);
    std::fs::write(&index_path, index.to_string()).unwrap();
    edit_file(&dir.path().join("transformer").join(shard), |t| {
        assert!(t.remove(key).is_some())
    });
    let error = error_of(Pipeline::load(dir.path(), Precision::Bf16));
    assert!(error.contains(key), "{error}");

    // An autoencoder key diffusers' layout does not have.
    let dir = model(TinyModelOptions {
        layout: Layout::Diffusers,
        ..TinyModelOptions::tiny()
    });
    let unknown = "decoder.up_blocks.0.resnets.0.extra.weight";
    edit_file(&dir.path().join(DIFFUSERS_VAE), |t| {
        t.insert(
            unknown.into(),
            Tensor::zeros(2, DType::BF16, &Device::Cpu).unwrap(),
        );
    });
    let error = error_of(Pipeline::load(dir.path(), Precision::Bf16));
    assert!(error.contains(unknown), "{error}");
}

#[test]
fn float8_text_encoders_load() {
    let dir = model(TinyModelOptions {
        text_dtype: DType::F8E4M3,
        ..TinyModelOptions::tiny()
    });
    let raw = candle_core::safetensors::load(
        dir.path().join("text_encoder_2/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        raw["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].dtype(),
        DType::F8E4M3
    );
    assert_eq!(raw["shared.weight"].dtype(), DType::BF16);
    let pipeline = Pipeline::load(dir.path(), Precision::Bf16).unwrap();
    let (t5, clip) = pipeline.token_ids("a cat").unwrap();
    assert!(!t5.is_empty() && !clip.is_empty());
    let held_in_fp8 = pipeline.encode_prompt("a cat").unwrap();

    // T5 holds its float8 linear weights as they are and widens them in the forward: the same
    // states as from the same weights widened to bf16 in the file (e4m3 is exact in bf16), at
    // one byte per linear weight.
    let widened = model(TinyModelOptions {
        text_dtype: DType::F8E4M3,
        ..TinyModelOptions::tiny()
    });
    let mut float8_bytes = 0;
    edit_file(
        &widened.path().join("text_encoder_2/model.safetensors"),
        |tensors| {
            for tensor in tensors.values_mut() {
                if tensor.dtype() == DType::F8E4M3 {
                    float8_bytes += tensor.elem_count() as u64;
                    *tensor = tensor.to_dtype(DType::BF16).unwrap();
                }
            }
        },
    );
    assert!(float8_bytes > 0);
    let bf16 = Pipeline::load(widened.path(), Precision::Bf16).unwrap();
    let held_in_bf16 = bf16.encode_prompt("a cat").unwrap();
    assert_eq!(max_abs_diff(&held_in_fp8.t5, &held_in_bf16.t5), 0.0);
    assert_eq!(
        bf16.weight_bytes() - pipeline.weight_bytes(),
        float8_bytes,
        "each float8 weight is held in one byte, not two"
    );
}
