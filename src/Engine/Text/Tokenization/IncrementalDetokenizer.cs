using System.Text;

namespace LocalVllm.Engine.Text.Tokenization;

/// <summary>
/// Turns one sequence's generated ids into text as they arrive, emitting only complete text: bytes of a UTF-8
/// character split across tokens wait for the rest (never a U+FFFD mid-stream), SentencePiece's dummy-prefix space
/// is dropped only at the very start of the text, special tokens are skipped by default, and text that could be the
/// start of a stop string is held back until it is decided. A matched stop string is not part of the text.
/// </summary>
public sealed class IncrementalDetokenizer
{
    private readonly ModelTokenizer _tokenizer;
    private readonly bool _skipSpecial;
    private readonly IReadOnlyList<string> _stop;
    private readonly List<byte> _pending = [];
    private readonly StringBuilder _text = new();
    private bool _atStart;
    private int _emitted;

    /// <summary>
    /// Creates a detokenizer for a sequence whose prompt was <paramref name="promptIds"/> (used only to know whether the
    /// output starts the text, for SentencePiece's leading space).
    /// </summary>
    public IncrementalDetokenizer(ModelTokenizer tokenizer, IReadOnlyList<int> promptIds, bool skipSpecialTokens = true,
        IReadOnlyList<string>? stop = null)
    {
        _tokenizer = tokenizer;
        _skipSpecial = skipSpecialTokens;
        _stop = stop ?? [];
        _atStart = !promptIds.Any(id => !tokenizer.IsSpecial(id) && tokenizer.TokenBytes(id).Length > 0);
    }

    /// <summary>All text decided so far (what has been emitted).</summary>
    public string Text => _text.ToString(0, _emitted);

    /// <summary>The stop string that ended the text, once one matched.</summary>
    public string? MatchedStop { get; private set; }

    /// <summary>Adds one token; returns the newly decided text (possibly empty).</summary>
    public string Add(int tokenId)
    {
        if (MatchedStop is not null) return "";
        if (!(_skipSpecial && _tokenizer.IsSpecial(tokenId)))
        {
            var bytes = _tokenizer.TokenBytes(tokenId);
            if (_atStart && bytes.Length > 0)
            {
                if (_tokenizer.IsSentencePiece && !_tokenizer.IsSpecial(tokenId) && bytes[0] == (byte)' ') bytes = bytes[1..];
                _atStart = false;
            }
            foreach (var b in bytes) _pending.Add(b);
            int complete = CompleteUtf8Prefix(_pending);
            if (complete > 0)
            {
                _text.Append(Encoding.UTF8.GetString(_pending.GetRange(0, complete).ToArray()));
                _pending.RemoveRange(0, complete);
            }
        }
        return Advance(final: false);
    }

    /// <summary>Ends the stream: releases held-back text (and any dangling partial character as U+FFFD).</summary>
    public string Flush()
    {
        if (MatchedStop is null && _pending.Count > 0)
        {
            _text.Append(Encoding.UTF8.GetString(_pending.ToArray()));
            _pending.Clear();
        }
        return Advance(final: true);
    }

    private string Advance(bool final)
    {
        if (MatchedStop is not null) return "";
        var all = _text.ToString();
        // Text before _emitted could not start a stop string (held-back suffixes guarantee it), so search from there.
        int at = -1;
        foreach (var stop in _stop)
        {
            int i = all.IndexOf(stop, _emitted, StringComparison.Ordinal);
            if (i >= 0 && (at < 0 || i < at)) { at = i; MatchedStop = stop; }
        }
        if (at >= 0)
        {
            var piece = all[_emitted..at];
            _text.Length = at;
            _emitted = at;
            return piece;
        }
        int safe = all.Length;
        if (!final)
            foreach (var stop in _stop)
                for (int k = Math.Min(stop.Length - 1, all.Length - _emitted); k > 0; k--)
                    if (string.CompareOrdinal(all, all.Length - k, stop, 0, k) == 0) { safe = Math.Min(safe, all.Length - k); break; }
        if (safe <= _emitted) return "";
        var emitted = all[_emitted..safe];
        _emitted = safe;
        return emitted;
    }

    /// <summary>Length of the longest prefix of <paramref name="bytes"/> that ends on a UTF-8 character boundary.</summary>
    private static int CompleteUtf8Prefix(List<byte> bytes)
    {
        int n = bytes.Count;
        // Look back at most 3 bytes for the start of an unfinished character.
        for (int back = 1; back <= Math.Min(4, n); back++)
        {
            byte b = bytes[n - back];
            if ((b & 0xC0) == 0x80) continue; // continuation byte
            int need = (b & 0x80) == 0 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 1;
            return back >= need ? n : n - back;
        }
        return n;
    }
}
