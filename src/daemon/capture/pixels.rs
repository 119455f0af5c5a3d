//! A frame's pixels as the stages pass them on: host memory, or (feature `gpu`) GPU
//! memory that inference binds to the engine directly (`engine::device`).

/// A frame's pixels: in host memory, or (feature `gpu`) still on the GPU.
pub enum Pixels {
    Host(image::RgbImage),
    #[cfg(feature = "gpu")]
    Device(crate::engine::device::DeviceFrame),
}

impl Pixels {
    /// Width and height.
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Pixels::Host(img) => img.dimensions(),
            #[cfg(feature = "gpu")]
            Pixels::Device(d) => (d.width as u32, d.height as u32),
        }
    }

    pub fn is_device(&self) -> bool {
        !matches!(self, Pixels::Host(_))
    }

    /// The pixels in host memory as RGB8 (a device frame is copied down).
    pub fn into_host(self) -> Result<image::RgbImage, String> {
        match self {
            Pixels::Host(img) => Ok(img),
            #[cfg(feature = "gpu")]
            Pixels::Device(d) => d.to_host().map_err(|e| e.to_string()),
        }
    }
}
