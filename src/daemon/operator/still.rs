//! Still pictures (JPEG) of judged frames, for `latest.jpg` and the evidence store: the
//! banner text is written by GStreamer's `textoverlay`, as on the live view, and the
//! picture is encoded by `jpegenc` (libjpeg-turbo), through one small pipeline kept
//! per size. Without those plugins the picture is encoded by the `image` crate and
//! carries no text (logged once).

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app::{AppSink, AppSrc};
use image::RgbImage;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StillError {
    #[error("cannot encode a JPEG: {0}")]
    Encode(String),
}

/// The elements the text path needs (all in gstreamer1.0-plugins-base/-good and -x).
pub const ELEMENTS: [&str; 5] = [
    "appsrc",
    "videoconvert",
    "textoverlay",
    "jpegenc",
    "appsink",
];

/// The elements of the text path that are not installed, with their packages; None
/// when all are there. GStreamer must be initialised.
pub fn missing_elements() -> Option<String> {
    let missing: Vec<&str> = ELEMENTS
        .into_iter()
        .filter(|e| gst::ElementFactory::find(e).is_none())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "GStreamer element(s) not installed: {} (textoverlay: gstreamer1.0-x; \
             jpegenc: gstreamer1.0-plugins-good)",
            missing.join(", ")
        )
    })
}

/// How long one picture may take through the pipeline before it is given up.
const PULL_TIMEOUT: Duration = Duration::from_secs(5);

struct Pipeline {
    size: (u32, u32),
    pipeline: gst::Pipeline,
    src: AppSrc,
    banner: gst::Element,
    enc: gst::Element,
    sink: AppSink,
    pushed: u64,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Encodes stills, one at a time; keeps its pipeline between pictures of one size.
#[derive(Default)]
pub struct StillEncoder {
    current: Option<Pipeline>,
    /// The text path failed to build once: the `image` crate encodes from then on.
    without_text: bool,
}

/// Sets `textoverlay`'s font and padding so that one line of banner text sits inside a
/// band `band` pixels tall on a picture `width` pixels wide (as the element sees it):
/// no automatic resizing, no wrapping (a line too long is cut at the right edge). Sizes
/// are pango points at 96 dpi (4/3 pixel each); the banner's ~45 characters of bold
/// sans take about 0.55 em each.
pub fn style_banner(overlay: &gst::Element, band: u32, width: u32) {
    let by_height = band * 9 / 20;
    let by_width = width * 3 / 100;
    let points = by_height.min(by_width).clamp(6, 40);
    overlay.set_property("auto-resize", false);
    overlay.set_property_from_str("wrap-mode", "none");
    overlay.set_property("font-desc", format!("Sans Bold {points}"));
    overlay.set_property("ypad", ((band / 10).max(1)) as i32);
    overlay.set_property("xpad", (band / 2) as i32);
}

impl StillEncoder {
    /// `picture` as a JPEG of `quality` (1-100) with `text` in its banner (none when
    /// `text` is empty).
    pub fn encode(
        &mut self,
        picture: &RgbImage,
        text: &str,
        quality: u8,
    ) -> Result<Vec<u8>, StillError> {
        if !self.without_text {
            match self.encode_with_text(picture, text, quality) {
                Ok(jpeg) => return Ok(jpeg),
                Err(Fallback::Build(why)) => {
                    tracing::warn!(
                        "stills: {why}; pictures are encoded without their banner text \
                         (install gstreamer1.0-x and gstreamer1.0-plugins-good)"
                    );
                    self.without_text = true;
                }
                Err(Fallback::Failed(why)) => {
                    // A pipeline that failed once is built anew next time.
                    self.current = None;
                    return Err(StillError::Encode(why));
                }
            }
        }
        plain_jpeg(picture, quality)
    }

    fn encode_with_text(
        &mut self,
        picture: &RgbImage,
        text: &str,
        quality: u8,
    ) -> Result<Vec<u8>, Fallback> {
        let size = picture.dimensions();
        if self.current.as_ref().is_none_or(|p| p.size != size) {
            self.current = None;
            self.current = Some(build(size).map_err(Fallback::Build)?);
        }
        let Some(p) = self.current.as_mut() else {
            return Err(Fallback::Build("no pipeline".into()));
        };
        p.banner.set_property("text", text);
        p.banner.set_property("silent", text.is_empty());
        p.enc
            .set_property("quality", i32::from(quality.clamp(1, 100)));
        let mut buffer = gst::Buffer::from_slice(picture.as_raw().clone());
        if let Some(b) = buffer.get_mut() {
            b.set_pts(gst::ClockTime::from_seconds(p.pushed));
            b.set_duration(gst::ClockTime::from_seconds(1));
        }
        p.pushed += 1;
        p.src
            .push_buffer(buffer)
            .map_err(|e| Fallback::Failed(format!("the still pipeline refused a frame: {e}")))?;
        let sample = p
            .sink
            .try_pull_sample(gst::ClockTime::from_nseconds(PULL_TIMEOUT.as_nanos() as u64))
            .ok_or_else(|| Fallback::Failed(bus_error(&p.pipeline)))?;
        let buffer = sample
            .buffer()
            .ok_or_else(|| Fallback::Failed("the still pipeline gave no buffer".into()))?;
        let map = buffer
            .map_readable()
            .map_err(|e| Fallback::Failed(e.to_string()))?;
        Ok(map.as_slice().to_vec())
    }
}

enum Fallback {
    /// The pipeline cannot be made (a plugin is missing).
    Build(String),
    /// It was made but did not give a picture.
    Failed(String),
}

fn build((width, height): (u32, u32)) -> Result<Pipeline, String> {
    if let Some(why) = missing_elements() {
        return Err(why);
    }
    let text = format!(
        "appsrc name=src format=time block=true max-buffers=1 \
         caps=video/x-raw,format=RGB,width={width},height={height},framerate=0/1 \
         ! videoconvert ! textoverlay name=banner valignment=top halignment=left \
         shaded-background=false ! videoconvert \
         ! jpegenc name=enc ! appsink name=sink sync=false max-buffers=1"
    );
    let pipeline = gst::parse::launch(&text)
        .map_err(|e| e.to_string())?
        .downcast::<gst::Pipeline>()
        .map_err(|_| "not a pipeline".to_string())?;
    let by = |name: &str| {
        pipeline
            .by_name(name)
            .ok_or_else(|| format!("no element `{name}`"))
    };
    let src = by("src")?
        .downcast::<AppSrc>()
        .map_err(|_| "src is not an appsrc".to_string())?;
    let sink = by("sink")?
        .downcast::<AppSink>()
        .map_err(|_| "sink is not an appsink".to_string())?;
    let (banner, enc) = (by("banner")?, by("enc")?);
    style_banner(&banner, super::draw::banner_height(height), width);
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|e| e.to_string())?;
    Ok(Pipeline {
        size: (width, height),
        pipeline,
        src,
        banner,
        enc,
        sink,
        pushed: 0,
    })
}

/// The pipeline's last error message, if it posted one.
fn bus_error(pipeline: &gst::Pipeline) -> String {
    let found = pipeline.bus().and_then(|bus| {
        bus.iter().find_map(|m| match m.view() {
            gst::MessageView::Error(e) => Some(e.error().to_string()),
            _ => None,
        })
    });
    found.unwrap_or_else(|| "the still pipeline gave no picture in 5 s".into())
}

fn plain_jpeg(picture: &RgbImage, quality: u8) -> Result<Vec<u8>, StillError> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
        .encode_image(picture)
        .map_err(|e| StillError::Encode(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn text_goes_into_the_band_and_the_rest_keeps_its_colours() {
        gst::init().unwrap();
        let mut img = RgbImage::from_pixel(320, 240, Rgb([0, 150, 60]));
        for y in 120..240 {
            for x in 0..320 {
                img.put_pixel(x, y, Rgb([200, 200, 200]));
            }
        }
        let mut enc = StillEncoder::default();
        let with = enc.encode(&img, "cam1   stripes   NG", 90).unwrap();
        let without = enc.encode(&img, "", 90).unwrap();
        // Three in a row through one pipeline, then another size.
        let again = enc.encode(&img, "cam1   stripes   NG", 90).unwrap();
        let small = RgbImage::from_pixel(64, 48, Rgb([10, 10, 10]));
        assert!(enc.encode(&small, "x", 50).is_ok());
        let decode = |b: &[u8]| image::load_from_memory(b).unwrap().to_rgb8();
        let (w, n) = (decode(&with), decode(&without));
        assert_eq!(w.dimensions(), (320, 240));
        assert_eq!(decode(&again).dimensions(), (320, 240));
        // White text pixels in the top-left band only where there is text.
        let bright = |i: &RgbImage| {
            (0..20u32)
                .flat_map(|y| (0..160u32).map(move |x| (x, y)))
                .filter(|&(x, y)| i.get_pixel(x, y).0.iter().all(|&c| c > 200))
                .count()
        };
        assert!(bright(&w) > 30, "text pixels: {}", bright(&w));
        assert_eq!(bright(&n), 0);
        let p = n.get_pixel(300, 200).0;
        assert!(p.iter().all(|&c| (190..=210).contains(&c)), "{p:?}");
        assert!(!enc.without_text);
    }
}
