//! Settings chosen by name (command-line flags, environment variables, the precision cache):
//! each variant's one name, so the model layer needs no command-line library's derive and
//! every reader parses the same names.

/// An enum of settings with one name per variant.
pub trait Named: Copy + Sized + 'static {
    /// Every variant, in the order help texts list them.
    const ALL: &'static [Self];

    fn name(self) -> &'static str;

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == name)
    }
}

/// `named!(Type { Variant => "name", ... })` implements [`Named`].
macro_rules! named {
    ($ty:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $crate::model::Named for $ty {
            const ALL: &'static [Self] = &[$(<$ty>::$variant),+];

            fn name(self) -> &'static str {
                match self {
                    $(<$ty>::$variant => $name),+
                }
            }
        }
    };
}
pub(crate) use named;
