//! What the appsink delivers, turned into what the stages use: an RGB image from a raw
//! or encoded sample, the pacing rate of encoded images, and bus errors as one line that
//! names the element.

use gstreamer as gst;
use gstreamer::prelude::*;

/// Why a sample gave no image; the frame is skipped and counted, the stream goes on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(
        "frames are {0}; end the pipeline in `videoconvert ! video/x-raw,format=RGB ! appsink name=sink`"
    )]
    Format(String),
    #[error("appsink delivers `{0}`; use video/x-raw,format=RGB or encoded images")]
    Media(String),
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("{0}")]
    Malformed(String),
    #[error(transparent)]
    Size(#[from] crate::preprocess::SizeError),
}

pub(super) fn describe_error(e: &gst::message::Error) -> String {
    let from = e
        .src()
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| "pipeline".into());
    // GStreamer's messages quote the location, with any password in it.
    crate::daemon::config::redact_credentials(&match e.debug() {
        Some(d) => format!("{from}: {} ({d})", e.error()),
        None => format!("{from}: {}", e.error()),
    })
}

pub(super) fn bus_error(bus: &gst::Bus) -> Option<String> {
    let msg = bus.timed_pop_filtered(
        gst::ClockTime::from_mseconds(200),
        &[gst::MessageType::Error],
    )?;
    match msg.view() {
        gst::MessageView::Error(e) => Some(describe_error(e)),
        _ => None,
    }
}

/// The frame rate to pace encoded images at (they carry no timestamps).
pub(super) fn encoded_fps(sample: &gst::Sample) -> Option<f64> {
    let s = sample.caps()?.structure(0)?;
    if !s.name().starts_with("image/") {
        return None;
    }
    s.get::<gst::Fraction>("framerate")
        .ok()
        .filter(|f| f.numer() > 0 && f.denom() > 0)
        .map(|f| f.numer() as f64 / f.denom() as f64)
}

/// Why a sample gave no frame.
pub(super) enum Skip {
    /// This frame only (counted, the stream goes on).
    Frame(FrameError),
    /// Device frames do not work here (the camera switches to host memory).
    Device(String),
}

/// The frame of a sample from a pipeline delivering into `memory`.
pub(super) fn pixels(sample: &gst::Sample, memory: super::Memory) -> Result<super::Pixels, Skip> {
    match memory {
        super::Memory::Host => frame_image(sample)
            .map(super::Pixels::Host)
            .map_err(Skip::Frame),
        #[cfg(feature = "gpu")]
        device => crate::engine::device::DeviceFrame::from_sample(sample, device)
            .map(super::Pixels::Device)
            .map_err(|e| Skip::Device(e.to_string())),
        #[cfg(not(feature = "gpu"))]
        _ => Err(Skip::Device(
            "this cras is built without the `gpu` feature".into(),
        )),
    }
}

/// The RGB image of a sample.
pub(super) fn frame_image(sample: &gst::Sample) -> Result<image::RgbImage, FrameError> {
    let bad = |why: &str| FrameError::Malformed(why.to_string());
    let caps = sample.caps().ok_or_else(|| bad("sample without caps"))?;
    let s = caps.structure(0).ok_or_else(|| bad("empty caps"))?;
    let buffer = sample.buffer().ok_or_else(|| bad("sample without data"))?;
    let map = buffer
        .map_readable()
        .map_err(|_| bad("buffer not readable"))?;
    let data = map.as_slice();
    if s.name() == "video/x-raw" {
        let format = s.get::<&str>("format").unwrap_or("?");
        if format != "RGB" {
            return Err(FrameError::Format(format.to_string()));
        }
        let w = s
            .get::<i32>("width")
            .map_err(|_| bad("caps without width"))?;
        let h = s
            .get::<i32>("height")
            .map_err(|_| bad("caps without height"))?;
        crate::preprocess::check_size(w.max(0) as u32, h.max(0) as u32)?;
        let (w, h) = (w as usize, h as usize);
        // GStreamer pads RGB rows to 4 bytes.
        let stride = (w * 3 + 3) & !3;
        if data.len() < stride * (h.max(1) - 1) + w * 3 {
            return Err(bad(&format!(
                "frame of {} bytes is short for {w}x{h} RGB",
                data.len()
            )));
        }
        let mut rgb = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            rgb.extend_from_slice(&data[y * stride..y * stride + w * 3]);
        }
        image::RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| bad("frame size mismatch"))
    } else if s.name().starts_with("image/") {
        Ok(crate::preprocess::decode_rgb(data).map_err(|e| match e {
            crate::preprocess::DecodeError::Size(s) => FrameError::Size(s),
            crate::preprocess::DecodeError::Image(reason) => FrameError::Decode(reason),
        })?)
    } else {
        Err(FrameError::Media(s.name().to_string()))
    }
}
