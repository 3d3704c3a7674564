using System.Runtime.InteropServices;
using System.Text;

namespace LocalVllm.Engine.Text.Tokenization;

/// <summary>
/// Turns one sequence's generated ids into text as they arrive, emitting only complete text: bytes of a UTF-8
/// character split across tokens wait for the rest (never a U+FFFD mid-stream), SentencePiece's dummy-prefix space
/// is dropped only at the very start of the text, special tokens are skipped by default, and text that could be the
/// start of a stop string is held back until it is decided. A matched stop string is not part of the text unless the
/// detokenizer was asked to keep it.
/// </summary>
public sealed class IncrementalDetokenizer
{
    private readonly ModelTokenizer _tokenizer;
    private readonly bool _skipSpecial;
    private readonly IReadOnlyList<string> _stop;
    private readonly bool _includeStop;
    private readonly List<byte> _pending = [];
    // Decided text (emitted), and decoded text held back because it could start a stop string. Each token's work
    // touches only the held-back text and the new bytes, never the whole text, so a long generation costs the same
    // per token at its end as at its start.
    private readonly StringBuilder _text = new();
    private readonly StringBuilder _held = new();
    private int _deltaStart;
    private bool _atStart;

    /// <summary>
    /// Creates a detokenizer for a sequence whose prompt was <paramref name="promptIds"/> (used only to know whether the
    /// output starts the text, for SentencePiece's leading space).
    /// </summary>
    public IncrementalDetokenizer(ModelTokenizer tokenizer, IReadOnlyList<int> promptIds, bool skipSpecialTokens = true,
        IReadOnlyList<string>? stop = null, bool includeStop = false)
    {
        _tokenizer = tokenizer;
        _skipSpecial = skipSpecialTokens;
        _stop = stop ?? [];
        _includeStop = includeStop;
        _atStart = !promptIds.Any(id => !tokenizer.IsSpecial(id) && tokenizer.TokenBytes(id).Length > 0);
    }

    /// <summary>All text decided so far (what has been emitted). Builds a string of the whole text: O(length).</summary>
    public string Text => _text.ToString();

    /// <summary>Characters decided so far.</summary>
    public int Length => _text.Length;

    /// <summary>The stop string that ended the text, once one matched.</summary>
    public string? MatchedStop { get; private set; }

    /// <summary>The text decided since the previous call (for delta outputs); O(length of the delta).</summary>
    public string TakeDelta()
    {
        var delta = _text.ToString(_deltaStart, _text.Length - _deltaStart);
        _deltaStart = _text.Length;
        return delta;
    }

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
                _held.Append(Encoding.UTF8.GetString(CollectionsMarshal.AsSpan(_pending)[..complete]));
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
            _held.Append(Encoding.UTF8.GetString(CollectionsMarshal.AsSpan(_pending)));
            _pending.Clear();
        }
        return Advance(final: true);
    }

    /// <summary>Moves what is decided from the held-back text to the text: up to a stop string, or all but a possible stop-string start.</summary>
    private string Advance(bool final)
    {
        if (MatchedStop is not null || _held.Length == 0) return "";
        // Emitted text cannot start a stop string (held-back suffixes guarantee it), so only the held-back text is searched.
        var held = _held.ToString();
        int at = -1;
        foreach (var stop in _stop)
        {
            int i = held.IndexOf(stop, StringComparison.Ordinal);
            if (i >= 0 && (at < 0 || i < at)) { at = i; MatchedStop = stop; }
        }
        int safe = at < 0 ? held.Length : _includeStop ? at + MatchedStop!.Length : at;
        if (at < 0 && !final)
            foreach (var stop in _stop)
                for (int k = Math.Min(stop.Length - 1, held.Length); k > 0; k--)
                    if (string.CompareOrdinal(held, held.Length - k, stop, 0, k) == 0) { safe = Math.Min(safe, held.Length - k); break; }
        if (at >= 0) _held.Clear();
        else _held.Remove(0, safe);
        if (safe == 0) return "";
        var emitted = held[..safe];
        _text.Append(emitted);
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
