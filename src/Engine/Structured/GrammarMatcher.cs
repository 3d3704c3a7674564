namespace LocalVllm.Engine.Structured;

/// <summary>
/// One sequence's place in a <see cref="CompiledGrammar"/>: the set of parse threads that the output so far allows
/// (a pushdown automaton run breadth-first, so ambiguous grammars such as <c>anyOf</c> need no backtracking). Each
/// thread is a rule's automaton state and a persistent stack of return states.
/// <para>
/// <see cref="FillMask"/> gives the tokens that may come next: for each thread, the cached set of tokens that stay
/// inside its rule (see <see cref="TokenVocabulary"/>), plus a walk of the few trie subtrees where a token continues past
/// the rule's end, with the full stack. <see cref="TryAdvance(int)"/> moves by one token's bytes. Not thread-safe: one
/// matcher per sequence, used by the engine thread.
/// </para>
/// </summary>
public sealed class GrammarMatcher
{
    /// <summary>A thread whose stack grows past this is dropped (a left-recursive grammar would loop forever).</summary>
    private const int MaxStackDepth = 2_000;
    private readonly CompiledGrammar _grammar;
    private readonly TokenVocabulary _vocab;
    private List<Thread> _threads;

    /// <summary>A matcher at the start of <paramref name="grammar"/>.</summary>
    public GrammarMatcher(CompiledGrammar grammar, TokenVocabulary vocabulary)
    {
        _grammar = grammar;
        _vocab = vocabulary;
        var start = new ThreadSet(this);
        start.AddClosed(new Thread(grammar.Rules[grammar.Start], 0, null));
        _threads = start.Threads;
        IsAccepting = start.Accepted;
    }

    private GrammarMatcher(GrammarMatcher other)
    {
        _grammar = other._grammar;
        _vocab = other._vocab;
        _threads = other._threads;
        IsAccepting = other.IsAccepting;
    }

    /// <summary>The vocabulary whose tokens this matcher masks.</summary>
    public TokenVocabulary Vocabulary => _vocab;

    /// <summary>The grammar this matcher walks.</summary>
    public CompiledGrammar Grammar => _grammar;

    /// <summary>Whether the output so far is a complete match (EOS may come now).</summary>
    public bool IsAccepting { get; private set; }

    /// <summary>Whether the match is complete and nothing more may follow.</summary>
    public bool IsTerminated => IsAccepting && _threads.Count == 0;

    /// <summary>An independent copy at the same place (threads are immutable, so this is cheap).</summary>
    public GrammarMatcher Clone() => new(this);

    /// <summary>Advances by token <paramref name="tokenId"/>'s bytes; false (and no change) if the grammar refuses them.</summary>
    public bool TryAdvance(int tokenId) => TryAdvance(_vocab.TokenBytes(tokenId));

    /// <summary>Advances by <paramref name="bytes"/>; false (and no change) if the grammar refuses them.</summary>
    public bool TryAdvance(ReadOnlySpan<byte> bytes)
    {
        if (bytes.IsEmpty) return false;
        var threads = _threads;
        bool accepted = IsAccepting;
        foreach (byte b in bytes)
        {
            var next = Step(threads, b);
            if (next.Threads.Count == 0 && !next.Accepted) return false;
            threads = next.Threads;
            accepted = next.Accepted;
        }
        _threads = threads;
        IsAccepting = accepted;
        return true;
    }

    /// <summary>
    /// Sets in <paramref name="mask"/> (cleared first; one bit per token id) every token that may come next. EOS is
    /// not included: the caller allows it when <see cref="IsAccepting"/>.
    /// </summary>
    public void FillMask(Span<ulong> mask)
    {
        if (mask.Length < _vocab.Words) throw new ArgumentException($"the mask needs {_vocab.Words} words", nameof(mask));
        mask.Clear();
        ulong[]? scratch = null; // the per-thread buffer below, taken when a complement set is met
        foreach (var t in _threads)
        {
            var inside = _vocab.Inside(t.Dfa, t.State);
            if (inside.Complement)
            {
                scratch ??= t_scratch is { Length: var n } && n == _vocab.Words ? t_scratch : t_scratch = new ulong[_vocab.Words];
                _vocab.AllTokens.CopyTo(scratch);
                foreach (int id in inside.Ids) scratch[id >> 6] &= ~(1UL << id);
                for (int w = 0; w < scratch.Length; w++) mask[w] |= scratch[w];
            }
            else
            {
                foreach (int id in inside.Ids) mask[id >> 6] |= 1UL << id;
            }
            foreach (var (node, state) in inside.Boundaries)
            {
                var exits = new ThreadSet(this);
                exits.AddExits(new Thread(t.Dfa, state, t.Stack));
                if (exits.Threads.Count > 0) WalkChildren(node, exits.Threads, mask);
            }
        }
    }

    /// <summary>
    /// The bytes the grammar forces from here, up to <paramref name="max"/>: as long as exactly one byte may come next
    /// and the match is not complete (where it is, ending is the other choice). The matcher does not move.
    /// </summary>
    public byte[] ForcedBytes(int max)
    {
        List<byte>? forced = null; // most calls find a choice at once: nothing allocated
        var threads = _threads;
        bool accepted = IsAccepting;
        while ((forced?.Count ?? 0) < max && !accepted && threads.Count > 0)
        {
            // The threads are closed over calls and returns, so the bytes that may come next are those some thread's
            // automaton steps on: probe those first (array lookups), and step the matcher only by a lone one.
            int only = -1;
            for (int b = 0; b < 256 && only != -2; b++)
                foreach (var t in threads)
                    if (t.Dfa.Step(t.State, (byte)b) >= 0)
                    {
                        only = only == -1 ? b : -2;
                        break;
                    }
            if (only < 0) break;
            var next = Step(threads, (byte)only);
            (forced ??= []).Add((byte)only);
            threads = next.Threads;
            accepted = next.Accepted;
        }
        return forced is null ? [] : forced.ToArray();
    }

    /// <summary>Reused by <see cref="FillMask"/> on each thread: no 19 KB array per sequence and step.</summary>
    [ThreadStatic] private static ulong[]? t_scratch;

    /// <summary>Whether token <paramref name="tokenId"/> may come next (a full mask is not computed).</summary>
    public bool Allows(int tokenId) => Clone().TryAdvance(tokenId);

    private void WalkChildren(int node, List<Thread> threads, Span<ulong> mask)
    {
        var nodeEnd = _vocab.NodeEnd;
        var nodeByte = _vocab.NodeByte;
        for (int c = node + 1; c < nodeEnd[node]; c = nodeEnd[c])
        {
            var next = Step(threads, nodeByte[c]);
            if (next.Threads.Count == 0 && !next.Accepted) continue;
            _vocab.SetTokens(mask, c, c + 1);
            if (next.Threads.Count > 0 && nodeEnd[c] > c + 1) WalkChildren(c, next.Threads, mask);
        }
    }

    private ThreadSet Step(List<Thread> threads, byte b)
    {
        var next = new ThreadSet(this);
        foreach (var t in threads)
        {
            int s = t.Dfa.Step(t.State, b);
            if (s >= 0) next.AddClosed(new Thread(t.Dfa, s, t.Stack));
        }
        return next;
    }

    /// <summary>A rule's automaton state and the return stack under it.</summary>
    private readonly record struct Thread(RuleDfa Dfa, int State, Frame? Stack);

    /// <summary>An immutable return stack: where to continue (automaton and state) when the rule above it ends.</summary>
    private sealed class Frame
    {
        private readonly int _hash;

        public Frame(RuleDfa dfa, int state, Frame? parent)
        {
            Dfa = dfa;
            State = state;
            Parent = parent;
            Depth = (parent?.Depth ?? 0) + 1;
            _hash = HashCode.Combine(dfa.Id, state, parent?._hash ?? 0);
        }

        public RuleDfa Dfa { get; }
        public int State { get; }
        public Frame? Parent { get; }
        public int Depth { get; }

        public override int GetHashCode() => _hash;

        public override bool Equals(object? obj)
        {
            var a = this;
            var b = obj as Frame;
            while (true)
            {
                if (ReferenceEquals(a, b)) return true;
                if (a is null || b is null || a._hash != b._hash || a.State != b.State || a.Dfa != b.Dfa) return false;
                a = a.Parent;
                b = b.Parent;
            }
        }
    }

    /// <summary>Threads after epsilon moves (entering referenced rules, returning from finished ones), deduplicated.</summary>
    private sealed class ThreadSet(GrammarMatcher owner)
    {
        private HashSet<Thread>? _seen;
        public List<Thread> Threads { get; } = [];
        public bool Accepted { get; private set; }

        public void AddClosed(Thread t)
        {
            _seen ??= [];
            if (!_seen.Add(t)) return;
            if (t.Dfa.HasBytes[t.State]) Threads.Add(t);
            AddExits(t);
        }

        /// <summary>Only the moves that leave <paramref name="t"/>'s rule: calls from its state and the return.</summary>
        public void AddExits(Thread t)
        {
            var g = owner._grammar;
            foreach (var (rule, target) in t.Dfa.Refs[t.State])
            {
                if (!g.Productive[rule] || (t.Stack?.Depth ?? 0) >= MaxStackDepth) continue;
                // A tail call (the caller would only return after it) pushes nothing: right recursion stays flat.
                var d = t.Dfa;
                bool tail = d.Accept[target] && !d.HasBytes[target] && d.Refs[target].Length == 0;
                AddClosed(new Thread(g.Rules[rule], 0, tail ? t.Stack : new Frame(t.Dfa, target, t.Stack)));
            }
            if (t.Dfa.Accept[t.State])
            {
                if (t.Stack is null) Accepted = true;
                else AddClosed(new Thread(t.Stack.Dfa, t.Stack.State, t.Stack.Parent));
            }
        }
    }
}
