//! Tube names: the character set and length rules of beanstalkd.

use std::fmt;

use crate::limits::TUBE_NAME_MAX_BYTES;

/// True for the bytes beanstalkd allows in a tube name.
pub fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-+/;.$_()".contains(&b)
}

/// A valid tube name: 1 to 200 bytes of `A-Za-z0-9-+/;.$_()`, not starting
/// with `-`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TubeName(Box<str>);

/// Why a byte string is not a tube name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TubeNameError {
    Empty,
    TooLong,
    BadByte,
    LeadingHyphen,
}

impl fmt::Display for TubeNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TubeNameError::Empty => "tube name is empty",
            TubeNameError::TooLong => "tube name is longer than 200 bytes",
            TubeNameError::BadByte => "tube name has a byte outside A-Za-z0-9-+/;.$_()",
            TubeNameError::LeadingHyphen => "tube name starts with '-'",
        })
    }
}

impl std::error::Error for TubeNameError {}

impl TubeName {
    /// The tube every connection uses and watches when it opens.
    pub fn default_tube() -> TubeName {
        TubeName("default".into())
    }

    pub fn new(name: &[u8]) -> Result<TubeName, TubeNameError> {
        if name.is_empty() {
            return Err(TubeNameError::Empty);
        }
        if name.len() > TUBE_NAME_MAX_BYTES {
            return Err(TubeNameError::TooLong);
        }
        if !name.iter().all(|&b| is_name_byte(b)) {
            return Err(TubeNameError::BadByte);
        }
        if name[0] == b'-' {
            return Err(TubeNameError::LeadingHyphen);
        }
        // All name bytes are ASCII, so this cannot fail.
        let text = std::str::from_utf8(name).map_err(|_| TubeNameError::BadByte)?;
        Ok(TubeName(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TubeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TubeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl TryFrom<&str> for TubeName {
    type Error = TubeNameError;
    fn try_from(s: &str) -> Result<TubeName, TubeNameError> {
        TubeName::new(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_charset_and_rejects_the_rest() {
        assert!(TubeName::new(b"Az09-+/;.$_()").is_ok());
        assert_eq!(TubeName::new(b""), Err(TubeNameError::Empty));
        assert_eq!(TubeName::new(b"-a"), Err(TubeNameError::LeadingHyphen));
        assert_eq!(TubeName::new(b"a b"), Err(TubeNameError::BadByte));
        assert_eq!(TubeName::new(b"a\xff"), Err(TubeNameError::BadByte));
        assert!(TubeName::new(&[b'a'; 200]).is_ok());
        assert_eq!(TubeName::new(&[b'a'; 201]), Err(TubeNameError::TooLong));
    }
}
