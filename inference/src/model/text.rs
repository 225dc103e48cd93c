//! The two text encoders of Flux and their tokenizers: T5-XXL (per-token states, the
//! transformer's `txt`) and CLIP-L (the pooled vector, the transformer's `y`), both from
//! candle-transformers, loaded from HF `transformers` layouts.

use std::path::Path;

use candle_core::{DType, Device, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::t5;
use serde::Deserialize;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    Model, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer, TruncationParams,
};

use crate::error::Error;
use crate::model::manifest::{ClipFiles, T5Files};
use crate::model::spiece::SentencePieceModel;
use crate::model::weights::{self, TensorMap};

pub const CLIP_BOS: &str = "<|startoftext|>";
pub const CLIP_EOS: &str = "<|endoftext|>";

/// CLIP's word split (from HF's `CLIPTokenizerFast` conversion): contractions, letter runs,
/// single digits, runs of other non-space characters.
const CLIP_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

fn tokenizer_error(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {e}"))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidModel(format!("{}: {e}", path.display())))
}

pub fn t5_config(path: &Path) -> Result<t5::Config, Error> {
    read_json(path)
}

/// The fields of HF's `CLIPTextConfig` that the model needs, with HF's defaults.
#[derive(Debug, Deserialize)]
struct HfClipTextConfig {
    #[serde(default = "defaults::vocab_size")]
    vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "defaults::num_layers")]
    num_hidden_layers: usize,
    #[serde(default = "defaults::num_heads")]
    num_attention_heads: usize,
    #[serde(default = "defaults::max_positions")]
    max_position_embeddings: usize,
    #[serde(default = "defaults::hidden_act")]
    hidden_act: String,
    #[serde(default = "defaults::hidden_size")]
    projection_dim: usize,
}

mod defaults {
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_layers() -> usize {
        12
    }
    pub fn num_heads() -> usize {
        8
    }
    pub fn max_positions() -> usize {
        77
    }
    pub fn hidden_act() -> String {
        "quick_gelu".into()
    }
}

/// Reads a `CLIPTextConfig` or the `text_config` of a full `CLIPConfig`.
pub fn clip_config(path: &Path) -> Result<ClipTextConfig, Error> {
    let mut json: serde_json::Value = read_json(path)?;
    let text = json
        .get_mut("text_config")
        .map(serde_json::Value::take)
        .unwrap_or(json);
    let hf: HfClipTextConfig = serde_json::from_value(text)
        .map_err(|e| Error::InvalidModel(format!("{}: {e}", path.display())))?;
    if hf.hidden_act != "quick_gelu" {
        return Err(Error::InvalidModel(format!(
            "{}: hidden_act {} is not supported (CLIP-L uses quick_gelu)",
            path.display(),
            hf.hidden_act
        )));
    }
    Ok(ClipTextConfig {
        vocab_size: hf.vocab_size,
        embed_dim: hf.hidden_size,
        activation: Activation::QuickGelu,
        intermediate_size: hf.intermediate_size,
        max_position_embeddings: hf.max_position_embeddings,
        pad_with: None,
        num_hidden_layers: hf.num_hidden_layers,
        num_attention_heads: hf.num_attention_heads,
        projection_dim: hf.projection_dim,
    })
}

/// CLIP's byte-level BPE tokenizer built from `vocab.json` + `merges.txt`, configured as HF's
/// `CLIPTokenizerFast`: NFC, whitespace runs to one space, lowercase; `</w>` word ends;
/// `<|startoftext|> ... <|endoftext|>` around the ids.
pub fn clip_bpe_tokenizer(vocab: &Path, merges: &Path) -> Result<Tokenizer, Error> {
    let context = "building the CLIP BPE tokenizer";
    let to_str = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| tokenizer_error(context, "non-UTF-8 path"))
    };
    let bpe = BPE::from_file(&to_str(vocab)?, &to_str(merges)?)
        .unk_token(CLIP_EOS.into())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .build()
        .map_err(|e| tokenizer_error(context, e))?;
    let (bos, eos) = match (bpe.token_to_id(CLIP_BOS), bpe.token_to_id(CLIP_EOS)) {
        (Some(bos), Some(eos)) => (bos, eos),
        _ => {
            return Err(tokenizer_error(
                context,
                "vocab lacks <|startoftext|> / <|endoftext|>",
            ));
        }
    };
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| tokenizer_error(context, e))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tokenizer_error(context, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| tokenizer_error(context, e))?
        .with_pre_tokenizer(Some(tokenizers::pre_tokenizers::sequence::Sequence::new(
            vec![split.into(), ByteLevel::new(false, true, false).into()],
        )))
        .with_decoder(Some(ByteLevel::default()))
        .with_post_processor(Some(
            RobertaProcessing::new((CLIP_EOS.into(), eos), (CLIP_BOS.into(), bos))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
    Ok(tokenizer)
}

/// Both tokenizers, set up to produce what the encoders expect.
pub struct Tokenizers {
    t5: Tokenizer,
    clip: Tokenizer,
}

impl Tokenizers {
    pub fn load(
        model_dir: &Path,
        t5: &T5Files,
        t5_pad_id: u32,
        clip: &ClipFiles,
        clip_max: usize,
    ) -> Result<Self, Error> {
        let from_json = |file: &str| {
            let path = model_dir.join(file);
            Tokenizer::from_file(&path).map_err(|e| tokenizer_error(&path.display().to_string(), e))
        };
        // `spiece.model` alone (as some T5 directories ship) or `tokenizer.json`.
        let mut t5_tokenizer = match t5.tokenizer.ends_with(".model") {
            true => SentencePieceModel::read(&model_dir.join(&t5.tokenizer))?.t5_tokenizer()?,
            false => from_json(&t5.tokenizer)?,
        };
        let pad_token = t5_tokenizer.id_to_token(t5_pad_id).unwrap_or_default();
        // Flux pads T5 prompts to a fixed length and attends to the padding (no mask).
        t5_tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: t5.max_length,
                ..Default::default()
            }))
            .map_err(|e| tokenizer_error("T5 truncation", e))?
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(t5.max_length),
                pad_id: t5_pad_id,
                pad_token,
                ..Default::default()
            }));
        let mut clip_tokenizer = match (&clip.tokenizer, &clip.vocab, &clip.merges) {
            (Some(json), _, _) => from_json(json)?,
            (None, Some(vocab), Some(merges)) => {
                clip_bpe_tokenizer(&model_dir.join(vocab), &model_dir.join(merges))?
            }
            _ => {
                return Err(Error::InvalidModel(
                    "clip needs tokenizer or vocab + merges".into(),
                ));
            }
        };
        // CLIP is causal and pooled at the end-of-text token, so padding would change
        // nothing: truncate to the position table and leave it unpadded.
        clip_tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: clip_max,
                ..Default::default()
            }))
            .map_err(|e| tokenizer_error("CLIP truncation", e))?
            .with_padding(None);
        Ok(Self {
            t5: t5_tokenizer,
            clip: clip_tokenizer,
        })
    }

    pub fn t5_ids(&self, prompt: &str) -> Result<Vec<u32>, Error> {
        let encoding = self
            .t5
            .encode(prompt, true)
            .map_err(|e| tokenizer_error("T5", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn clip_ids(&self, prompt: &str) -> Result<Vec<u32>, Error> {
        let encoding = self
            .clip
            .encode(prompt, true)
            .map_err(|e| tokenizer_error("CLIP", e))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// Hands out tensors in the dtype they are held in, whatever the builder asks for: candle's T5
/// converts each weight to the activations' dtype where it uses it, so weights held narrower
/// than the compute dtype are widened one layer at a time instead of all at load.
struct AsHeld(TensorMap);

impl AsHeld {
    fn dtype_of(&self, name: &str, requested: DType) -> DType {
        self.0.get(name).map_or(requested, Tensor::dtype)
    }
}

impl SimpleBackend for AsHeld {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        SimpleBackend::get(
            &self.0,
            shape,
            name,
            init,
            self.dtype_of(name, dtype),
            device,
        )
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        SimpleBackend::get_unchecked(&self.0, name, self.dtype_of(name, dtype), device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// T5 and CLIP built on one device: T5 computing in the compute dtype from weights as they are
/// held, CLIP in the dtype of its weights.
pub struct TextEncoders {
    t5: t5::T5EncoderModel,
    t5_compute: DType,
    clip: ClipTextTransformer,
    weight_bytes: u64,
}

impl TextEncoders {
    /// Builds T5 from its weights as they are held, to compute in `t5_compute`, and CLIP in the
    /// dtype paired with its weights; weights already in their dtype are shared, not copied.
    pub fn build(
        (t5_weights, t5_compute): (&TensorMap, DType),
        t5_config: &t5::Config,
        (clip_weights, clip_dtype): (&TensorMap, DType),
        clip_config: &ClipTextConfig,
        device: &Device,
    ) -> Result<Self, Error> {
        let t5_vb = VarBuilder::from_backend(
            Box::new(AsHeld(t5_weights.clone())),
            t5_compute,
            device.clone(),
        );
        let t5 = t5::T5EncoderModel::load(t5_vb, t5_config)
            .map_err(|e| Error::InvalidModel(format!("T5 weights: {e}")))?;
        let clip_vb = VarBuilder::from_tensors(clip_weights.clone(), clip_dtype, device);
        let clip = ClipTextTransformer::new(clip_vb.pp("text_model"), clip_config)
            .map_err(|e| Error::InvalidModel(format!("CLIP weights: {e}")))?;
        Ok(Self {
            t5,
            t5_compute,
            clip,
            weight_bytes: weights::byte_size(t5_weights) + weights::byte_size(clip_weights),
        })
    }

    /// Bytes of both encoders' weights as held.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// `(1, tokens, t5_width)` T5 states and the `(1, clip_width)` pooled CLIP vector.
    pub fn encode(&self, t5_ids: &[u32], clip_ids: &[u32]) -> Result<(Tensor, Tensor), Error> {
        let device = self.t5.device().clone();
        let t5_ids = Tensor::new(t5_ids, &device)?.unsqueeze(0)?;
        // The encoder's forward takes `&mut self` for a decoder cache it never fills here;
        // cloning shares the weights.
        let t5_states = self.t5.clone().forward_dt(&t5_ids, Some(self.t5_compute))?;
        let clip_ids = Tensor::new(clip_ids, &device)?.unsqueeze(0)?;
        let pooled = self.clip.forward(&clip_ids)?;
        Ok((t5_states, pooled))
    }
}
