namespace LocalVllm.Engine.Structured;

/// <summary>
/// The bytes of JSON string text, as a small decoder: which byte may come next in well-formed UTF-8 whose characters
/// a JSON string takes as themselves (printable ASCII but <c>"</c> and <c>\</c>, and every multi-byte character),
/// and where a character ends. The vocabulary walk uses it to take whole subtrees of such text at once (see
/// <see cref="TokenVocabulary"/> and <see cref="RuleDfa.CharRun"/>).
/// </summary>
internal static class Utf8Text
{
    /// <summary>Decoder states: 0 between characters; 1-7 inside a multi-byte character (what the next byte must be).</summary>
    public const int States = 8;

    /// <summary>The state after <paramref name="b"/> in state <paramref name="u"/>, or -1 if the byte cannot come there.</summary>
    public static int Next(int u, byte b) => u switch
    {
        0 => b switch
        {
            >= 0x20 and < 0x7F when b != (byte)'"' && b != (byte)'\\' => 0,
            >= 0xC2 and <= 0xDF => 1,
            0xE0 => 3,
            0xED => 4,
            >= 0xE1 and <= 0xEF => 2,
            0xF0 => 6,
            >= 0xF1 and <= 0xF3 => 5,
            0xF4 => 7,
            _ => -1,
        },
        1 => b is >= 0x80 and <= 0xBF ? 0 : -1, // one continuation byte left
        2 => b is >= 0x80 and <= 0xBF ? 1 : -1, // two left
        3 => b is >= 0xA0 and <= 0xBF ? 1 : -1, // after E0: no overlong forms
        4 => b is >= 0x80 and <= 0x9F ? 1 : -1, // after ED: no surrogates
        5 => b is >= 0x80 and <= 0xBF ? 2 : -1, // three left
        6 => b is >= 0x90 and <= 0xBF ? 2 : -1, // after F0: no overlong forms
        7 => b is >= 0x80 and <= 0x8F ? 2 : -1, // after F4: at most U+10FFFF
        _ => -1,
    };
}
