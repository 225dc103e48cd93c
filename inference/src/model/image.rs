//! Decoded images to PNG files carrying their generation parameters as text chunks.

use candle_core::{DType, Tensor};

use crate::error::Error;

/// Encodes a `(3, height, width)` image in [-1, 1] as an 8-bit RGB PNG. Each `(keyword,
/// text)` goes into a tEXt chunk, or an iTXt chunk (UTF-8) when the text is not Latin-1, as
/// tEXt allows only Latin-1.
pub fn encode_png(image: &Tensor, text: &[(&str, String)]) -> Result<Vec<u8>, Error> {
    let (channels, height, width) = image.dims3()?;
    if channels != 3 {
        return Err(Error::InvalidModel(format!(
            "decoder produced {channels} channels, not 3"
        )));
    }
    // [-1, 1] -> [0, 255], rounded; channel-last for PNG.
    let pixels = ((image.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((1, 2, 0))?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let mut png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png, width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, value) in text {
            if value.chars().all(|c| u32::from(c) < 256) {
                encoder.add_text_chunk(keyword.to_string(), value.clone())?;
            } else {
                encoder.add_itxt_chunk(keyword.to_string(), value.clone())?;
            }
        }
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
        writer.finish()?;
    }
    Ok(png)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn pixels_and_text_round_trip() -> Result<(), Error> {
        let image =
            Tensor::new(&[-1f32, 0.0, 1.0, 0.5, -0.5, 2.0], &Device::Cpu)?.reshape((3, 1, 2))?;
        let png = encode_png(
            &image,
            &[("prompt", "a cat".to_string()), ("model", "猫".to_string())],
        )?;
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().expect("valid png");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        reader.next_frame(&mut buf).expect("frame");
        // (r, g, b) of pixel 0 then pixel 1; 0.0 -> 127.5 rounds to 128, 2.0 clamps to 255.
        assert_eq!(buf, vec![0, 255, 64, 128, 191, 255]);
        let info = reader.info();
        assert_eq!(info.uncompressed_latin1_text[0].keyword, "prompt");
        assert_eq!(info.uncompressed_latin1_text[0].text, "a cat");
        assert_eq!(info.utf8_text[0].keyword, "model");
        assert_eq!(info.utf8_text[0].get_text().expect("utf8"), "猫");
        Ok(())
    }
}
