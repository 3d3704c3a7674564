namespace LocalVllm.Engine.Text.Tokenization;

/// <summary>
/// GPT-2's byte-level alphabet: every byte maps to a printable character so that BPE vocabularies hold only
/// printable strings. Decoding a token maps its characters back to bytes.
/// </summary>
internal static class ByteLevel
{
    public static readonly char[] ByteToChar = Build();
    public static readonly Dictionary<char, byte> CharToByte = ByteToChar.Select((c, b) => (c, b)).ToDictionary(x => x.c, x => (byte)x.b);

    private static char[] Build()
    {
        var map = new char[256];
        int next = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            map[b] = printable ? (char)b : (char)(256 + next++);
        }
        return map;
    }

    /// <summary>The bytes a byte-level token string stands for.</summary>
    public static byte[] ToBytes(string token)
    {
        var bytes = new byte[token.Length];
        for (int i = 0; i < token.Length; i++)
            bytes[i] = CharToByte.TryGetValue(token[i], out var b) ? b : (byte)'?';
        return bytes;
    }
}

/// <summary>GPT-2's byte-to-character map, for writing byte-level vocabularies.</summary>
public static class ByteLevelAlphabet
{
    /// <summary>The printable character that stands for byte <paramref name="b"/>.</summary>
    public static char Char(byte b) => ByteLevel.ByteToChar[b];
}
