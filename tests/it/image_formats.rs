//! Every supported format decodes to the RGB8 pixels PIL gives (16-bit scaled, alpha dropped,
//! GIF's first frame, EXIF orientation applied); bad input is refused with a clear error.

use crate::common::*;
use detectd::imaging::{decode, ImageError};
use tch::Kind;

fn make_formats() -> std::path::PathBuf {
    let dir = data_dir().join("formats");
    if !dir.join("rotated.jpg.expected.png").exists() {
        let script = root().join("tests/support/formats.py");
        run_python("formats.py", &[script.as_os_str(), dir.as_os_str()], &[]);
    }
    dir
}

#[test]
fn formats_decode_to_expected_rgb8() {
    let dir = make_formats();
    for name in [
        "rgb.png",
        "rgb.bmp",
        "rgb.tiff",
        "rgb.webp",
        "rgba.png",
        "gray.png",
        "gray16.png",
        "anim.gif",
        "rotated.jpg",
    ] {
        let ours = decode_file(&dir.join(name));
        let expected = decode_file(&dir.join(format!("{name}.expected.png")));
        assert_eq!(
            ours.size(),
            expected.size(),
            "{name}: size (orientation applied?)"
        );
        let diff = (ours.to_kind(Kind::Float) - expected.to_kind(Kind::Float)).abs();
        let (max, mean) = (
            diff.max().double_value(&[]),
            diff.mean(Kind::Float).double_value(&[]),
        );
        if name.ends_with(".jpg") {
            // Two JPEG decoders may differ by an IDCT rounding step; orientation would not.
            assert!(mean < 2.0, "{name}: mean difference {mean}");
        } else {
            assert_eq!(max, 0.0, "{name}: lossless formats decode exactly");
        }
    }
}

#[test]
fn bad_input_is_refused_clearly() {
    assert!(matches!(decode(b"", 1 << 30), Err(ImageError::Empty)));
    assert!(matches!(
        decode(b"definitely not an image", 1 << 30),
        Err(ImageError::Format)
    ));
    let png = std::fs::read(make_formats().join("rgb.png")).expect("read png");
    assert!(matches!(
        decode(&png[..png.len() / 2], 1 << 30),
        Err(ImageError::Decode(_))
    ));
    assert!(matches!(
        decode(&png, 100),
        Err(ImageError::TooLarge { pixels: 2400, .. })
    ));
    // Formats image knows but detectd does not read (only the six of the README are built
    // in): refused by name, not decoded.
    let pnm = [b"P6\n2 2\n255\n".as_slice(), &[7u8; 12]].concat();
    let qoi = [b"qoif".as_slice(), &[0, 0, 0, 2, 0, 0, 0, 2, 3, 0], &[0; 8]].concat();
    for (name, bytes) in [("PNM", pnm), ("QOI", qoi)] {
        match decode(&bytes, 1 << 30) {
            Err(ImageError::Format) => {}
            Err(ImageError::Decode(e)) if e.contains("not supported") => {}
            other => panic!("{name}: {:?}", other.map(|i| (i.width, i.height))),
        }
    }
    let jpeg = std::fs::read(make_formats().join("rotated.jpg")).expect("read jpeg");
    assert!(decode(&jpeg, 1 << 30).is_ok());
    let truncated = &jpeg[..jpeg.len() * 2 / 3];
    assert!(
        matches!(decode(truncated, 1 << 30), Err(ImageError::Decode(_))),
        "a truncated JPEG is an error, not a grey-padded image"
    );
}
